//! Elementwise operators: same shape, broadcast, comparisons; with the arithmetic that shape
//! computations do on their values.

use super::{broadcast, Node, Rule};
use crate::dim::Dim;
use crate::dtype;

pub(super) const RULES: &[(&[&str], Rule)] = &[
    (
        &[
            "Relu",
            "LeakyRelu",
            "Sigmoid",
            "Tanh",
            "Erf",
            "Exp",
            "Log",
            "Sqrt",
            "Reciprocal",
            "Clip",
            "Softmax",
            "LogSoftmax",
            "Hardmax",
            "Gelu",
            "Elu",
            "Selu",
            "Celu",
            "HardSigmoid",
            "HardSwish",
            "Softplus",
            "Softsign",
            "Mish",
            "ThresholdedRelu",
            "Shrink",
            "Floor",
            "Ceil",
            "Round",
            "Sin",
            "Cos",
            "Tan",
            "Asin",
            "Acos",
            "Atan",
            "Sinh",
            "Cosh",
            "Asinh",
            "Acosh",
            "Atanh",
            "Sign",
            "CumSum",
            "Trilu",
            "InstanceNormalization",
            "GroupNormalization",
            "LpNormalization",
            "LRN",
            "MeanVarianceNormalization",
            "RMSNormalization",
            "ScatterElements",
            "ScatterND",
            "Scatter",
            "ReverseSequence",
        ],
        same,
    ),
    (&["Identity"], identity),
    (&["Neg"], neg),
    (&["Abs"], abs),
    (
        &[
            "Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Pow", "Sum", "Mean", "PRelu", "BitShift",
        ],
        arith,
    ),
    (
        &[
            "Equal",
            "Less",
            "Greater",
            "LessOrEqual",
            "GreaterOrEqual",
            "And",
            "Or",
            "Xor",
        ],
        compare,
    ),
    (&["Not"], not),
    (&["IsNaN", "IsInf"], is_special),
    (&["Where"], where_),
    (&["Cast"], cast),
    (&["CastLike"], cast_like),
];

fn same(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    Some(())
}

fn identity(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    if let Some(v) = c.value(0) {
        c.set_value(0, v);
    }
    if let Some(s) = c.sequence(0) {
        c.set_sequence(0, s.clone());
    }
    Some(())
}

fn neg(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    let v = c.value(0)?;
    c.set_value(0, v.iter().map(|d| Dim::Known(0).sub(d)).collect());
    Some(())
}

fn abs(c: &mut Node) -> Option<()> {
    c.same(0, 0);
    let v = c.value(0)?;
    c.set_value(
        0,
        v.iter()
            .map(|d| match d {
                Dim::Known(x) => Dim::Known(x.abs()),
                // Shape values are non-negative.
                Dim::Sym(_) if d.offset() >= 0 => d.clone(),
                _ => Dim::Unknown,
            })
            .collect(),
    );
    Some(())
}

/// Element `i` of a value broadcast to `n` elements (a single element repeats).
fn at(v: &[Dim], i: usize) -> Dim {
    if v.len() == 1 {
        v[0].clone()
    } else {
        v.get(i).cloned().unwrap_or(Dim::Unknown)
    }
}

/// Apply `f` elementwise over the values of all inputs (numpy broadcasting of 1-element values).
fn elementwise(c: &mut Node, f: impl Fn(&Dim, &Dim) -> Dim) -> Option<()> {
    let vals: Vec<Vec<Dim>> = (0..c.inputs()).map(|i| c.value(i)).collect::<Option<_>>()?;
    let n = vals.iter().map(Vec::len).max()?;
    if vals.iter().any(|v| v.len() != n && v.len() != 1) {
        return None;
    }
    let out = (0..n)
        .map(|i| {
            let mut acc = at(&vals[0], i);
            for v in &vals[1..] {
                acc = f(&acc, &at(v, i));
            }
            acc
        })
        .collect();
    c.set_value(0, out);
    Some(())
}

fn shapes(c: &Node, k: usize) -> Option<Vec<Vec<Dim>>> {
    (0..k).map(|i| c.shape(i)).collect()
}

fn arith(c: &mut Node) -> Option<()> {
    let k = c.inputs();
    c.set(0, c.dtype(0), shapes(c, k).map(|s| broadcast(&s)));
    if !matches!(c.dtype(0), dtype::INT64 | dtype::INT32) {
        return Some(());
    }
    match c.n.op_type.as_str() {
        "Add" | "Sum" => elementwise(c, Dim::add),
        "Sub" => elementwise(c, Dim::sub),
        "Mul" => elementwise(c, Dim::mul),
        "Div" => elementwise(c, Dim::div),
        "Mod" if c.attr_i("fmod", 0) == 0 => elementwise(c, Dim::rem),
        "Max" => elementwise(c, Dim::max),
        "Min" => elementwise(c, Dim::min),
        _ => Some(()),
    }
}

fn compare(c: &mut Node) -> Option<()> {
    c.set(0, dtype::BOOL, shapes(c, 2).map(|s| broadcast(&s)));
    let op = c.n.op_type.clone();
    elementwise(c, |a, b| match (a, b) {
        (Dim::Known(x), Dim::Known(y)) => Dim::Known(match op.as_str() {
            "Equal" => x == y,
            "Less" => x < y,
            "Greater" => x > y,
            "LessOrEqual" => x <= y,
            "GreaterOrEqual" => x >= y,
            "And" => *x != 0 && *y != 0,
            "Or" => *x != 0 || *y != 0,
            _ => (*x != 0) != (*y != 0),
        } as i64),
        _ if a == b && op == "Equal" => Dim::Known(1),
        // A symbolic value is a dimension, never negative: `Equal(shape, -1)` is false.
        (Dim::Sym(_), Dim::Known(k)) | (Dim::Known(k), Dim::Sym(_)) if *k < 0 && op == "Equal" => Dim::Known(0),
        _ => Dim::Unknown,
    })
}

fn not(c: &mut Node) -> Option<()> {
    c.set(0, dtype::BOOL, c.shape(0));
    let v = c.value(0)?;
    c.set_value(
        0,
        v.iter()
            .map(|d| d.known().map_or(Dim::Unknown, |x| Dim::Known((x == 0) as i64)))
            .collect(),
    );
    Some(())
}

fn is_special(c: &mut Node) -> Option<()> {
    c.set(0, dtype::BOOL, c.shape(0));
    Some(())
}

fn where_(c: &mut Node) -> Option<()> {
    c.set(0, c.dtype(1), shapes(c, 3).map(|s| broadcast(&s)));
    let (cond, a, b) = (c.value(0)?, c.value(1)?, c.value(2)?);
    let n = cond.len().max(a.len()).max(b.len());
    let v = (0..n)
        .map(|i| match at(&cond, i).known() {
            Some(0) => at(&b, i),
            Some(_) => at(&a, i),
            None if at(&a, i) == at(&b, i) => at(&a, i),
            None => Dim::Unknown,
        })
        .collect();
    c.set_value(0, v);
    Some(())
}

fn cast(c: &mut Node) -> Option<()> {
    let to = c.attr_i("to", 0) as i32;
    cast_to(c, to)
}

/// CastLike: the type of input 1, the shape (and value) of input 0.
fn cast_like(c: &mut Node) -> Option<()> {
    let to = c.dtype(1);
    cast_to(c, to)
}

/// The value of a cast: integers stay, float constants truncate toward zero (as a cast does).
fn cast_to(c: &mut Node, to: i32) -> Option<()> {
    c.set(0, to, c.shape(0));
    if matches!(to, dtype::INT64 | dtype::INT32) {
        let v = match c.value(0) {
            Some(v) => v,
            None => c.floats(0)?.iter().map(|&f| Dim::Known(f.trunc() as i64)).collect(),
        };
        c.set_value(0, v);
    } else if dtype::is_float(to) {
        if let Some(f) = c.floats(0) {
            c.set_floats(0, f);
        }
    }
    Some(())
}
