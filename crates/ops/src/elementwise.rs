//! Element-wise operators. The rules of ops whose inputs broadcast (`Kind::Broadcast`) return
//! each input's gradient shaped like the output; the engine sums it back to the input's shape.

use super::{g0, g0_owned, Out};
use crate::ctx::Ctx;
use crate::Kind::{Broadcast, NoGradient, NoRule, Vjp};
use crate::{op, Op};
use dagr_onnx::dtype;

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "Add",
        7,
        Some(shapes::arith),
        Broadcast(add),
        "dA = unb(g), dB = unb(g)",
    ),
    op(
        "Sub",
        7,
        Some(shapes::arith),
        Broadcast(sub),
        "dA = unb(g), dB = -unb(g)",
    ),
    op(
        "Mul",
        7,
        Some(shapes::arith),
        Broadcast(mul),
        "dA = unb(g B), dB = unb(g A)",
    ),
    op(
        "Div",
        7,
        Some(shapes::arith),
        Broadcast(div),
        "dA = unb(g / B), dB = -unb(g Y / B)",
    ),
    op(
        "Pow",
        7,
        Some(shapes::arith),
        Broadcast(pow),
        "dA = unb(g B A^(B-1)), dB = unb(g Y ln A) (0 where A <= 0)",
    ),
    op("Sum", 1, Some(shapes::arith), Broadcast(add), "dX_i = unb(g)"),
    op("Neg", 1, Some(shapes::neg), Vjp(neg), "dX = -g"),
    op("Identity", 1, Some(shapes::identity), Vjp(identity), "dX = g"),
    op("Relu", 1, Some(crate::infer::same), Vjp(relu), "dX = g where X > 0"),
    op(
        "LeakyRelu",
        1,
        Some(crate::infer::same),
        Vjp(leaky_relu),
        "dX = g where X > 0, alpha g elsewhere",
    ),
    op("Sigmoid", 1, Some(crate::infer::same), Vjp(sigmoid), "dX = g Y (1 - Y)"),
    op("Tanh", 1, Some(crate::infer::same), Vjp(tanh), "dX = g (1 - Y^2)"),
    op(
        "Erf",
        9,
        Some(crate::infer::same),
        Vjp(erf),
        "dX = g 2/sqrt(pi) exp(-X^2)",
    ),
    op("Exp", 1, Some(crate::infer::same), Vjp(exp), "dX = g Y"),
    op("Log", 1, Some(crate::infer::same), Vjp(log), "dX = g / X"),
    op("Sqrt", 1, Some(crate::infer::same), Vjp(sqrt), "dX = g / (2 Y)"),
    op("Abs", 1, Some(shapes::abs), Vjp(abs), "dX = g sign(X)"),
    op(
        "Clip",
        1,
        Some(crate::infer::same),
        Vjp(clip),
        "dX = g where min <= X <= max",
    ),
    op(
        "Max",
        1,
        Some(shapes::arith),
        Broadcast(max),
        "dA = unb(g [A > B] + g/2 [A = B]), dB likewise",
    ),
    op(
        "Min",
        1,
        Some(shapes::arith),
        Broadcast(min),
        "dA = unb(g [A < B] + g/2 [A = B]), dB likewise",
    ),
    op(
        "Where",
        9,
        Some(shapes::where_),
        Broadcast(where_),
        "dX = unb(where(C, g, 0)), dY = unb(where(C, 0, g))",
    ),
    op(
        "Cast",
        6,
        Some(shapes::cast),
        Vjp(cast),
        "dX = cast(g, type of X) for floating X",
    ),
    op(
        "CastLike",
        15,
        Some(shapes::cast_like),
        Vjp(cast_like),
        "dX = cast(g, type of X) for floating X; the type input has none",
    ),
    op(
        "Gelu",
        20,
        Some(crate::infer::same),
        Vjp(gelu),
        "dX = g (Φ(X) + X φ(X)); tanh: its derivative",
    ),
    op(
        "HardSigmoid",
        1,
        Some(crate::infer::same),
        Vjp(hard_sigmoid),
        "dX = g alpha where 0 < alpha X + beta < 1",
    ),
    op(
        "HardSwish",
        14,
        Some(crate::infer::same),
        Vjp(hard_swish),
        "dX = g (2X + 3)/6 on (-3, 3), g above",
    ),
    op(
        "Elu",
        1,
        Some(crate::infer::same),
        Vjp(elu),
        "dX = g where X > 0, g (Y + alpha) elsewhere",
    ),
    op(
        "Selu",
        1,
        Some(crate::infer::same),
        Vjp(selu),
        "dX = g gamma where X > 0, g (Y + gamma alpha) elsewhere",
    ),
    op(
        "Celu",
        12,
        Some(crate::infer::same),
        Vjp(celu),
        "dX = g where X > 0, g exp(X / alpha) elsewhere",
    ),
    op(
        "Softplus",
        1,
        Some(crate::infer::same),
        Vjp(softplus),
        "dX = g sigmoid(X)",
    ),
    op(
        "Softsign",
        1,
        Some(crate::infer::same),
        Vjp(softsign),
        "dX = g / (1 + |X|)^2",
    ),
    op(
        "Mish",
        18,
        Some(crate::infer::same),
        Vjp(mish),
        "dX = g (t + X sigmoid(X) (1 - t^2)), t = tanh(softplus(X))",
    ),
    op(
        "ThresholdedRelu",
        10,
        Some(crate::infer::same),
        Vjp(thresholded_relu),
        "dX = g where X > alpha",
    ),
    op(
        "Shrink",
        9,
        Some(crate::infer::same),
        Vjp(shrink),
        "dX = g where |X| > lambd",
    ),
    op(
        "PRelu",
        7,
        Some(shapes::arith),
        Broadcast(prelu),
        "dX = g where X > 0, g slope elsewhere; dslope = unb(g X where X <= 0)",
    ),
    op(
        "Reciprocal",
        1,
        Some(crate::infer::same),
        Vjp(reciprocal),
        "dX = -g Y^2",
    ),
    op("Sin", 7, Some(crate::infer::same), Vjp(sin), "dX = g cos X"),
    op("Cos", 7, Some(crate::infer::same), Vjp(cos), "dX = -g sin X"),
    op("Tan", 7, Some(crate::infer::same), Vjp(tan), "dX = g (1 + Y^2)"),
    op("Sinh", 9, Some(crate::infer::same), Vjp(sinh), "dX = g cosh X"),
    op("Cosh", 9, Some(crate::infer::same), Vjp(cosh), "dX = g sinh X"),
    op("Asin", 7, Some(crate::infer::same), Vjp(asin), "dX = g / sqrt(1 - X^2)"),
    op(
        "Acos",
        7,
        Some(crate::infer::same),
        Vjp(acos),
        "dX = -g / sqrt(1 - X^2)",
    ),
    op("Atan", 7, Some(crate::infer::same), Vjp(atan), "dX = g / (1 + X^2)"),
    op(
        "Asinh",
        9,
        Some(crate::infer::same),
        Vjp(asinh),
        "dX = g / sqrt(1 + X^2)",
    ),
    op(
        "Acosh",
        9,
        Some(crate::infer::same),
        Vjp(acosh),
        "dX = g / sqrt(X^2 - 1)",
    ),
    op("Atanh", 9, Some(crate::infer::same), Vjp(atanh), "dX = g / (1 - X^2)"),
    op("Mean", 1, Some(shapes::arith), Broadcast(mean), "dX_i = unb(g) / n"),
    op(
        "Dropout",
        7,
        Some(shapes::dropout),
        Vjp(dropout),
        "dX = g mask / (1 - ratio) in training mode, g otherwise",
    ),
    op("Equal", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op("Greater", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op("Less", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op("GreaterOrEqual", 12, Some(shapes::compare), NoGradient, "no gradient"),
    op("LessOrEqual", 12, Some(shapes::compare), NoGradient, "no gradient"),
    op("Not", 1, Some(shapes::not), NoGradient, "no gradient"),
    op("And", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op("Or", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op(
        "Sign",
        9,
        Some(crate::infer::same),
        NoGradient,
        "no gradient (zero almost everywhere)",
    ),
    op(
        "Floor",
        1,
        Some(crate::infer::same),
        NoGradient,
        "no gradient (zero almost everywhere)",
    ),
    op(
        "Ceil",
        1,
        Some(crate::infer::same),
        NoGradient,
        "no gradient (zero almost everywhere)",
    ),
    op(
        "Round",
        11,
        Some(crate::infer::same),
        NoGradient,
        "no gradient (zero almost everywhere)",
    ),
    op(
        "Mod",
        10,
        Some(shapes::arith),
        NoGradient,
        "no gradient (a discrete op: index arithmetic)",
    ),
    op(
        "Hardmax",
        1,
        Some(crate::infer::same),
        NoGradient,
        "no gradient (zero almost everywhere)",
    ),
    op("IsNaN", 9, Some(shapes::is_special), NoGradient, "no gradient"),
    op("IsInf", 10, Some(shapes::is_special), NoGradient, "no gradient"),
    op("Xor", 1, Some(shapes::compare), NoGradient, "no gradient"),
    op("BitShift", 11, Some(shapes::arith), NoGradient, "no gradient"),
    op(
        "Scatter",
        9,
        Some(crate::infer::same),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::broadcast;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;
    use dagr_onnx::dtype;

    pub(crate) fn dropout(c: &mut Node) -> Option<()> {
        c.same(0, 0);
        c.set(1, dtype::BOOL, c.shape(0));
        Some(())
    }

    pub(crate) fn identity(c: &mut Node) -> Option<()> {
        c.same(0, 0);
        if let Some(v) = c.value(0) {
            c.set_value(0, v);
        }
        if let Some(s) = c.sequence(0) {
            c.set_sequence(0, s.clone());
        }
        Some(())
    }

    pub(crate) fn neg(c: &mut Node) -> Option<()> {
        c.same(0, 0);
        let v = c.value(0)?;
        c.set_value(0, v.iter().map(|d| Dim::Known(0).sub(d)).collect());
        Some(())
    }

    pub(crate) fn abs(c: &mut Node) -> Option<()> {
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
    pub(crate) fn at(v: &[Dim], i: usize) -> Dim {
        if v.len() == 1 {
            v[0].clone()
        } else {
            v.get(i).cloned().unwrap_or(Dim::Unknown)
        }
    }

    /// Apply `f` elementwise over the values of all inputs (numpy broadcasting of 1-element values).
    pub(crate) fn elementwise(c: &mut Node, f: impl Fn(&Dim, &Dim) -> Dim) -> Option<()> {
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

    pub(crate) fn shapes(c: &Node, k: usize) -> Option<Vec<Vec<Dim>>> {
        (0..k).map(|i| c.shape(i)).collect()
    }

    pub(crate) fn arith(c: &mut Node) -> Option<()> {
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

    pub(crate) fn compare(c: &mut Node) -> Option<()> {
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

    pub(crate) fn not(c: &mut Node) -> Option<()> {
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

    pub(crate) fn is_special(c: &mut Node) -> Option<()> {
        c.set(0, dtype::BOOL, c.shape(0));
        Some(())
    }

    pub(crate) fn where_(c: &mut Node) -> Option<()> {
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

    pub(crate) fn cast(c: &mut Node) -> Option<()> {
        let to = c.attr_i("to", 0) as i32;
        cast_to(c, to)
    }

    /// CastLike: the type of input 1, the shape (and value) of input 0.
    pub(crate) fn cast_like(c: &mut Node) -> Option<()> {
        let to = c.dtype(1);
        cast_to(c, to)
    }

    /// The value of a cast: integers stay, float constants truncate toward zero (as a cast does).
    pub(crate) fn cast_to(c: &mut Node, to: i32) -> Option<()> {
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
}

pub fn identity(_: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    Ok(vec![g0(g).map(String::from)])
}

pub fn neg(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    Ok(vec![g0(g).map(|g| c.op("Neg", &[g]))])
}

pub fn add(_: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else {
        return Ok(vec![None; need.len()]);
    };
    Ok(need.iter().map(|&n| n.then(|| g.to_string())).collect())
}

pub fn sub(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None, None]) };
    let ga = need[0].then(|| g.to_string());
    let gb = need[1].then(|| c.op("Neg", &[g]));
    Ok(vec![ga, gb])
}

pub fn mul(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None, None]) };
    let (a, b) = (c.input(0).to_string(), c.input(1).to_string());
    let ga = need[0].then(|| c.op("Mul", &[g, &b]));
    let gb = need[1].then(|| c.op("Mul", &[g, &a]));
    Ok(vec![ga, gb])
}

/// d(a/b)/da = 1/b, d(a/b)/db = -y/b.
pub fn div(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None, None]) };
    let y = c.output(0).to_string();
    let b = c.input(1).to_string();
    let gdb = c.op("Div", &[g, &b]);
    let gb = need[1].then(|| {
        let t = c.op("Mul", &[&gdb, &y]);
        c.op("Neg", &[&t])
    });
    Ok(vec![need[0].then_some(gdb), gb])
}

/// d(a^b)/da = b a^(b-1); d(a^b)/db = y ln(a), taken as 0 where a <= 0.
pub fn pow(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None, None]) };
    let y = c.output(0).to_string();
    let (a, b) = (c.input(0).to_string(), c.input(1).to_string());
    let ga = if need[0] {
        let one = c.scalar(1.0);
        // The exponent in the base's type (Pow allows another).
        let b32 = if c.dtype(&b) != c.float_type() {
            c.to_float(&b)
        } else {
            b.clone()
        };
        let bm1 = c.op("Sub", &[&b32, &one]);
        let p = c.op("Pow", &[&a, &bm1]);
        let t = c.op("Mul", &[&p, &b32]);
        let t = c.op("Mul", &[&t, g]);
        Some(t)
    } else {
        None
    };
    let gb = if need[1] {
        let zero = c.scalar(0.0);
        let pos = c.op("Greater", &[&a, &zero]);
        let one = c.scalar(1.0);
        let safe = c.op("Where", &[&pos, &a, &one]);
        let ln = c.op("Log", &[&safe]);
        let t = c.op("Mul", &[&y, &ln]);
        let t = c.op("Mul", &[&t, g]);
        let t = c.op("Where", &[&pos, &t, &zero]);
        Some(t)
    } else {
        None
    };
    Ok(vec![ga, gb])
}

pub fn relu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let zero = c.scalar(0.0);
    let pos = c.op("Greater", &[&x, &zero]);
    Ok(vec![Some(c.op("Where", &[&pos, g, &zero]))])
}

pub fn leaky_relu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let alpha = c.attr_f("alpha", 0.01) as f64;
    let zero = c.scalar(0.0);
    let a = c.scalar(alpha);
    let pos = c.op("Greater", &[&x, &zero]);
    let neg = c.op("Mul", &[g, &a]);
    Ok(vec![Some(c.op("Where", &[&pos, g, &neg]))])
}

pub fn sigmoid(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    let one = c.scalar(1.0);
    let om = c.op("Sub", &[&one, &y]);
    let d = c.op("Mul", &[&y, &om]);
    Ok(vec![Some(c.op("Mul", &[g, &d]))])
}

pub fn tanh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    let one = c.scalar(1.0);
    let y2 = c.op("Mul", &[&y, &y]);
    let d = c.op("Sub", &[&one, &y2]);
    Ok(vec![Some(c.op("Mul", &[g, &d]))])
}

/// d erf(x)/dx = 2/sqrt(pi) exp(-x^2) (GELU exports as Erf primitives).
pub fn erf(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let x2 = c.op("Mul", &[&x, &x]);
    let nx2 = c.op("Neg", &[&x2]);
    let e = c.op("Exp", &[&nx2]);
    let k = c.scalar(2.0 / std::f64::consts::PI.sqrt());
    let d = c.op("Mul", &[&e, &k]);
    Ok(vec![Some(c.op("Mul", &[g, &d]))])
}

pub fn exp(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    Ok(vec![Some(c.op("Mul", &[g, &y]))])
}

pub fn log(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    Ok(vec![Some(c.op("Div", &[g, &x]))])
}

pub fn sqrt(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let y = c.output(0).to_string();
    let half = c.scalar(0.5);
    let t = c.op("Div", &[g, &y]);
    Ok(vec![Some(c.op("Mul", &[&t, &half]))])
}

pub fn abs(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let s = c.op("Sign", &[&x]);
    Ok(vec![Some(c.op("Mul", &[g, &s]))])
}

/// Gradient passes where min <= x <= max (inclusive, as PyTorch's clamp).
pub fn clip(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else {
        return Ok(vec![None; need.len()]);
    };
    let x = c.input(0).to_string();
    let mut mask: Option<String> = None;
    let bounds: Vec<(String, &str)> = if c.b.opset >= 11 {
        [(1, "GreaterOrEqual"), (2, "LessOrEqual")]
            .iter()
            .filter(|(i, _)| c.has_input(*i))
            .map(|(i, op)| (c.input(*i).to_string(), *op))
            .collect()
    } else {
        let mut v = Vec::new();
        for (name, op) in [("min", "GreaterOrEqual"), ("max", "LessOrEqual")] {
            if let Some(a) = dagr_onnx::attr::attr_f(c.node, name) {
                v.push((c.scalar(a as f64), op));
            }
        }
        v
    };
    for (bound, op) in bounds {
        let m = c.op(op, &[&x, &bound]);
        mask = Some(match mask {
            None => m,
            Some(prev) => c.op("And", &[&prev, &m]),
        });
    }
    let out = match mask {
        None => g.to_string(),
        Some(m) => {
            let zero = c.scalar(0.0);
            c.op("Where", &[&m, g, &zero])
        }
    };
    let mut v = vec![Some(out)];
    v.resize(need.len(), None);
    Ok(v)
}

/// Two-input Max/Min: the selected operand gets the gradient; ties split it in half (PyTorch).
fn minmax(c: &mut Ctx, g: &[Option<String>], need: &[bool], pick: &str) -> Out {
    if need.len() != 2 {
        return Err(c.err("only the two-input form has a gradient rule"));
    }
    let Some(g) = g0(g) else { return Ok(vec![None, None]) };
    let (a, b) = (c.input(0).to_string(), c.input(1).to_string());
    let wins = c.op(pick, &[&a, &b]);
    let tie = c.op("Equal", &[&a, &b]);
    let one = c.scalar(1.0);
    let half = c.scalar(0.5);
    let zero = c.scalar(0.0);
    let wa = c.op("Where", &[&wins, &one, &zero]);
    let wa = c.op("Where", &[&tie, &half, &wa]);
    let mut out = vec![None, None];
    if need[0] {
        out[0] = Some(c.op("Mul", &[g, &wa]));
    }
    if need[1] {
        let wb = c.op("Sub", &[&one, &wa]);
        out[1] = Some(c.op("Mul", &[g, &wb]));
    }
    Ok(out)
}

pub fn max(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    minmax(c, g, need, "Greater")
}
pub fn min(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    minmax(c, g, need, "Less")
}

pub fn where_(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else {
        return Ok(vec![None, None, None]);
    };
    let cond = c.input(0).to_string();
    let zero = c.scalar(0.0);
    let mut out = vec![None, None, None];
    if need[1] {
        out[1] = Some(c.op("Where", &[&cond, g, &zero]));
    }
    if need[2] {
        out[2] = Some(c.op("Where", &[&cond, &zero, g]));
    }
    Ok(out)
}

/// Cast: the gradient is cast back to the input's type (only floating inputs get one).
pub fn cast(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let t = c.dtype(&x);
    if !dtype::is_float(t) {
        return Ok(vec![None]);
    }
    Ok(vec![Some(if t == c.dtype(c.output(0)) {
        g.to_string()
    } else {
        c.cast(g, t)
    })])
}

/// Dropout: with a mask output, dX = dY * mask / (1 - ratio); in inference mode, identity.
pub fn dropout(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0(g) else {
        return Ok(vec![None; need.len()]);
    };
    let training = if c.b.opset >= 12 {
        c.has_input(2) && c.const_input(2).map(|v| v.first() == Some(&1)).unwrap_or(true)
    } else {
        false
    };
    let has_mask = c.node.output.len() > 1 && !c.output(1).is_empty();
    let mut v = vec![None; need.len()];
    if !training {
        v[0] = Some(g.to_string());
        return Ok(v);
    }
    if !has_mask {
        return Err(c.err(
            "training-mode Dropout needs its mask output for the gradient; export with the mask or set the ratio to 0",
        ));
    }
    let ratio = if c.has_input(1) {
        let r = c.input(1).to_string();
        if c.dtype(&r) != c.float_type() {
            c.to_float(&r)
        } else {
            r
        }
    } else {
        c.scalar(0.5)
    };
    let mask = c.output(1).to_string();
    let m = c.to_float(&mask);
    let one = c.scalar(1.0);
    let keep = c.op("Sub", &[&one, &ratio]);
    let t = c.op("Mul", &[g, &m]);
    v[0] = Some(c.op("Div", &[&t, &keep]));
    Ok(v)
}

/// CastLike: like Cast toward the type of input 1, which carries no gradient.
pub fn cast_like(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let mut out = cast(c, g, &need[..1])?;
    out.push(None);
    Ok(out)
}

/// Gelu (opset 20): `approximate="none"`: `dX = g (Φ(x) + x φ(x))`; `"tanh"`:
/// `dX = g (0.5 (1 + t) + 0.5 x (1 - t²) k (1 + 3c x²))`, `t = tanh(k (x + c x³))`.
pub fn gelu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let half = c.scalar(0.5);
    let one = c.scalar(1.0);
    let d = if c.attr_s("approximate").as_deref() == Some("tanh") {
        let k = c.scalar((2.0 / std::f64::consts::PI).sqrt());
        let cc = c.scalar(0.044715);
        let three_c = c.scalar(3.0 * 0.044715);
        let x2 = c.op("Mul", &[&x, &x]);
        let x3 = c.op("Mul", &[&x2, &x]);
        let cx3 = c.op("Mul", &[&cc, &x3]);
        let inner = c.op("Add", &[&x, &cx3]);
        let u = c.op("Mul", &[&k, &inner]);
        let t = c.op("Tanh", &[&u]);
        let opt = c.op("Add", &[&one, &t]);
        let left = c.op("Mul", &[&half, &opt]);
        let t2 = c.op("Mul", &[&t, &t]);
        let sech2 = c.op("Sub", &[&one, &t2]);
        let cx2 = c.op("Mul", &[&three_c, &x2]);
        let du = c.op("Add", &[&one, &cx2]);
        let du = c.op("Mul", &[&k, &du]);
        let hx = c.op("Mul", &[&half, &x]);
        let right = c.op("Mul", &[&hx, &sech2]);
        let right = c.op("Mul", &[&right, &du]);
        c.op("Add", &[&left, &right])
    } else {
        let inv_sqrt2 = c.scalar(std::f64::consts::FRAC_1_SQRT_2);
        let inv_sqrt2pi = c.scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt());
        let xs = c.op("Mul", &[&x, &inv_sqrt2]);
        let e = c.op("Erf", &[&xs]);
        let ope = c.op("Add", &[&one, &e]);
        let cdf = c.op("Mul", &[&half, &ope]);
        let x2 = c.op("Mul", &[&x, &x]);
        let mhx2 = c.op("Mul", &[&x2, &half]);
        let nx2 = c.op("Neg", &[&mhx2]);
        let ex = c.op("Exp", &[&nx2]);
        let pdf = c.op("Mul", &[&ex, &inv_sqrt2pi]);
        let xpdf = c.op("Mul", &[&x, &pdf]);
        c.op("Add", &[&cdf, &xpdf])
    };
    Ok(vec![Some(c.op("Mul", &[&g, &d]))])
}

/// HardSigmoid `max(0, min(1, alpha x + beta))`: `dX = g alpha` where `0 < alpha x + beta < 1`.
pub fn hard_sigmoid(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let alpha = c.attr_f("alpha", 0.2) as f64;
    let beta = c.attr_f("beta", 0.5) as f64;
    let inside = linear_inside(c, &x, alpha, beta);
    let a = c.scalar(alpha);
    let ga = c.op("Mul", &[&g, &a]);
    let zero = c.scalar(0.0);
    Ok(vec![Some(c.op("Where", &[&inside, &ga, &zero]))])
}

/// Where `0 < alpha x + beta < 1`.
fn linear_inside(c: &mut Ctx, x: &str, alpha: f64, beta: f64) -> String {
    let a = c.scalar(alpha);
    let b = c.scalar(beta);
    let ax = c.op("Mul", &[x, &a]);
    let v = c.op("Add", &[&ax, &b]);
    let zero = c.scalar(0.0);
    let one = c.scalar(1.0);
    let above = c.op("Greater", &[&v, &zero]);
    let below = c.op("Less", &[&v, &one]);
    c.op("And", &[&above, &below])
}

/// HardSwish `x hardsigmoid(x)` (alpha 1/6, beta 1/2): `dX = g (2x + 3)/6` on (-3, 3), `g` above.
pub fn hard_swish(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let x = c.input(0).to_string();
    let inside = linear_inside(c, &x, 1.0 / 6.0, 0.5);
    let third = c.scalar(1.0 / 3.0);
    let half = c.scalar(0.5);
    let x3 = c.op("Mul", &[&x, &third]);
    let slope = c.op("Add", &[&x3, &half]);
    let three = c.scalar(3.0);
    let above = c.op("GreaterOrEqual", &[&x, &three]);
    let one = c.scalar(1.0);
    let zero = c.scalar(0.0);
    let outside = c.op("Where", &[&above, &one, &zero]);
    let d = c.op("Where", &[&inside, &slope, &outside]);
    Ok(vec![Some(c.op("Mul", &[&g, &d]))])
}

/// `g * d`, d built from X (and Y) by `deriv`: the common shape of the unary rules below.
fn unary(c: &mut Ctx, g: &[Option<String>], deriv: impl FnOnce(&mut Ctx, &str, &str) -> String) -> Out {
    let Some(g) = g0_owned(g) else { return Ok(vec![None]) };
    let (x, y) = (c.input(0).to_string(), c.output(0).to_string());
    let d = deriv(c, &x, &y);
    Ok(vec![Some(c.op("Mul", &[&g, &d]))])
}

/// Where X > `at`: `a`, elsewhere `b`.
fn above(c: &mut Ctx, x: &str, at: f64, a: &str, b: &str) -> String {
    let t = c.scalar(at);
    let m = c.op("Greater", &[x, &t]);
    c.op("Where", &[&m, a, b])
}

pub fn elu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let alpha = c.attr_f("alpha", 1.0) as f64;
    unary(c, g, |c, x, y| {
        let (one, a) = (c.scalar(1.0), c.scalar(alpha));
        let neg = c.op("Add", &[y, &a]);
        above(c, x, 0.0, &one, &neg)
    })
}

pub fn selu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let alpha = c.attr_f("alpha", 1.673_263_2) as f64;
    let gamma = c.attr_f("gamma", 1.050_701) as f64;
    unary(c, g, |c, x, y| {
        let (gm, ga) = (c.scalar(gamma), c.scalar(gamma * alpha));
        let neg = c.op("Add", &[y, &ga]);
        above(c, x, 0.0, &gm, &neg)
    })
}

pub fn celu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let alpha = c.attr_f("alpha", 1.0) as f64;
    unary(c, g, |c, x, _| {
        let (one, a) = (c.scalar(1.0), c.scalar(alpha));
        let xa = c.op("Div", &[x, &a]);
        let e = c.op("Exp", &[&xa]);
        above(c, x, 0.0, &one, &e)
    })
}

pub fn softplus(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| c.op("Sigmoid", &[x]))
}

pub fn softsign(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| {
        let one = c.scalar(1.0);
        let a = c.op("Abs", &[x]);
        let d = c.op("Add", &[&one, &a]);
        let d2 = c.op("Mul", &[&d, &d]);
        c.op("Reciprocal", &[&d2])
    })
}

/// Mish: y = x tanh(softplus(x)), y' = t + x sigmoid(x) (1 - t^2).
pub fn mish(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| {
        let sp = c.op("Softplus", &[x]);
        let t = c.op("Tanh", &[&sp]);
        let s = c.op("Sigmoid", &[x]);
        let one = c.scalar(1.0);
        let t2 = c.op("Mul", &[&t, &t]);
        let omt = c.op("Sub", &[&one, &t2]);
        let xs = c.op("Mul", &[x, &s]);
        let r = c.op("Mul", &[&xs, &omt]);
        c.op("Add", &[&t, &r])
    })
}

pub fn thresholded_relu(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let alpha = c.attr_f("alpha", 1.0) as f64;
    unary(c, g, |c, x, _| {
        let (one, zero) = (c.scalar(1.0), c.scalar(0.0));
        above(c, x, alpha, &one, &zero)
    })
}

/// Shrink: 1 where |x| > lambd, 0 between.
pub fn shrink(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    let lambd = c.attr_f("lambd", 0.5) as f64;
    unary(c, g, |c, x, _| {
        let (one, zero) = (c.scalar(1.0), c.scalar(0.0));
        let a = c.op("Abs", &[x]);
        above(c, &a, lambd, &one, &zero)
    })
}

pub fn reciprocal(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, _, y| {
        let y2 = c.op("Mul", &[y, y]);
        c.op("Neg", &[&y2])
    })
}

pub fn sin(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| c.op("Cos", &[x]))
}

pub fn cos(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| {
        let s = c.op("Sin", &[x]);
        c.op("Neg", &[&s])
    })
}

pub fn tan(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, _, y| {
        let one = c.scalar(1.0);
        let y2 = c.op("Mul", &[y, y]);
        c.op("Add", &[&one, &y2])
    })
}

pub fn sinh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| c.op("Cosh", &[x]))
}

pub fn cosh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    unary(c, g, |c, x, _| c.op("Sinh", &[x]))
}

/// 1 / sqrt(s (1 - x^2)) style derivatives: `sign / sqrt(k0 + k2 x^2)` or its square root
/// left out (`root = false`: `sign / (k0 + k2 x^2)`).
fn inverse_trig(c: &mut Ctx, g: &[Option<String>], k0: f64, k2: f64, sign: f64, root: bool) -> Out {
    unary(c, g, |c, x, _| {
        let (a, b, s) = (c.scalar(k0), c.scalar(k2), c.scalar(sign));
        let x2 = c.op("Mul", &[x, x]);
        let bx2 = c.op("Mul", &[&x2, &b]);
        let q = c.op("Add", &[&a, &bx2]);
        let q = if root { c.op("Sqrt", &[&q]) } else { q };
        c.op("Div", &[&s, &q])
    })
}

pub fn asin(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, 1.0, -1.0, 1.0, true)
}
pub fn acos(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, 1.0, -1.0, -1.0, true)
}
pub fn atan(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, 1.0, 1.0, 1.0, false)
}
pub fn asinh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, 1.0, 1.0, 1.0, true)
}
pub fn acosh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, -1.0, 1.0, 1.0, true)
}
pub fn atanh(c: &mut Ctx, g: &[Option<String>], _: &[bool]) -> Out {
    inverse_trig(c, g, 1.0, -1.0, 1.0, false)
}

/// PRelu: dX = g where X > 0, g slope elsewhere; dSlope = g X where X <= 0 (both summed to
/// their input's shape by the engine: the slope may broadcast X, or X the slope).
pub fn prelu(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None, None]);
    };
    let (x, slope) = (c.input(0).to_string(), c.input(1).to_string());
    let zero = c.scalar(0.0);
    let pos = c.op("Greater", &[&x, &zero]);
    let mut out = vec![None, None];
    if need[0] {
        let gs = c.op("Mul", &[&g, &slope]);
        out[0] = Some(c.op("Where", &[&pos, &g, &gs]));
    }
    if need[1] {
        let gx = c.op("Mul", &[&g, &x]);
        out[1] = Some(c.op("Where", &[&pos, &zero, &gx]));
    }
    Ok(out)
}

/// Mean of several inputs: each gets g / n.
pub fn mean(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    let Some(g) = g0_owned(g) else {
        return Ok(vec![None; need.len()]);
    };
    let n = c.scalar(need.len() as f64);
    let gn = c.op("Div", &[&g, &n]);
    Ok(need.iter().map(|&w| w.then(|| gn.clone())).collect())
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_float, attr_int, attr_string};
    use dagr_onnx::dtype;
    use Gen::{AboveOne, Distinct, Positive, Unit};
    vec![
        case("add_broadcast", "Add", vec![x(&[2, 3, 4]), x(&[3, 1])]),
        case("sub_broadcast", "Sub", vec![x(&[2, 3]), x(&[3])]),
        case("mul_broadcast", "Mul", vec![x(&[2, 1, 4]), x(&[3, 1])]),
        case("div", "Div", vec![x(&[2, 3]), x(&[2, 3])]),
        case("div_broadcast", "Div", vec![x(&[2, 3]), x(&[1])]),
        case("pow", "Pow", vec![x(&[2, 3]), x(&[3])]).gen(Positive),
        case("sum3", "Sum", vec![x(&[2, 3]), x(&[3]), x(&[2, 1])]),
        case("neg", "Neg", vec![x(&[3, 2])]),
        case("identity", "Identity", vec![x(&[3, 2])]),
        case("relu", "Relu", vec![x(&[3, 4])]),
        case("leaky_relu", "LeakyRelu", vec![x(&[3, 4])]).attrs(vec![attr_float("alpha", 0.2)]),
        case("sigmoid", "Sigmoid", vec![x(&[3, 4])]),
        case("tanh", "Tanh", vec![x(&[3, 4])]),
        case("erf", "Erf", vec![x(&[3, 4])]),
        case("gelu", "Gelu", vec![x(&[3, 4])]).opset(20),
        case("gelu_tanh", "Gelu", vec![x(&[3, 4])])
            .attrs(vec![attr_string("approximate", "tanh")])
            .opset(20),
        case("hard_sigmoid", "HardSigmoid", vec![x(&[3, 4])])
            .attrs(vec![attr_float("alpha", 0.3), attr_float("beta", 0.4)]),
        case(
            "hard_swish",
            "HardSwish",
            vec![In::F(vec![6], vec![-4.0, -2.0, -0.5, 0.7, 2.5, 3.5])],
        ),
        case("cast_like", "CastLike", vec![x(&[3, 4]), In::F(vec![], vec![0.0])]),
        case("exp", "Exp", vec![x(&[3, 4])]),
        case("log", "Log", vec![x(&[3, 4])]).gen(Positive),
        case("sqrt", "Sqrt", vec![x(&[3, 4])]).gen(Positive),
        case("abs", "Abs", vec![x(&[3, 4])]),
        // Bounds between the Distinct grid's values (0.015 or more from each).
        case(
            "clip",
            "Clip",
            vec![x(&[3, 4]), In::F(vec![], vec![-0.105]), In::F(vec![], vec![0.095])],
        )
        .gen(Distinct),
        case("clip_min_only", "Clip", vec![x(&[3, 4]), In::F(vec![], vec![0.0])]).gen(Distinct),
        case("max", "Max", vec![x(&[2, 3]), x(&[3])]).gen(Distinct),
        case("min", "Min", vec![x(&[2, 3]), x(&[2, 3])]).gen(Distinct),
        case(
            "where",
            "Where",
            vec![
                In::B(vec![2, 3], vec![true, false, true, false, false, true]),
                x(&[2, 3]),
                x(&[3]),
            ],
        ),
        case("cast_double", "Cast", vec![x(&[2, 3])]).attrs(vec![attr_int("to", dtype::DOUBLE as i64)]),
        case(
            "dropout_inference",
            "Dropout",
            vec![x(&[2, 3]), In::F(vec![], vec![0.3])],
        ),
        case("elu", "Elu", vec![x(&[3, 4])]).attrs(vec![attr_float("alpha", 0.7)]),
        case("selu", "Selu", vec![x(&[3, 4])]),
        // tract 0.23's Celu disagrees with ONNX Runtime's forward for alpha != 1.
        case("celu", "Celu", vec![x(&[3, 4])])
            .attrs(vec![attr_float("alpha", 1.5)])
            .only(ORT_ONLY),
        case("celu_alpha_1", "Celu", vec![x(&[3, 4])]),
        case("softplus", "Softplus", vec![x(&[3, 4])]),
        case("softsign", "Softsign", vec![x(&[3, 4])]),
        case("mish", "Mish", vec![x(&[3, 4])]).opset(18),
        // Values 0.01 or more away from the jump at alpha (the differences step by 2e-3).
        case("thresholded_relu", "ThresholdedRelu", vec![x(&[3, 4])])
            .attrs(vec![attr_float("alpha", 0.5)])
            .gen(Distinct),
        // Values 0.01 or more away from the jumps at ±lambd.
        case("shrink", "Shrink", vec![x(&[3, 4])])
            .attrs(vec![attr_float("lambd", 0.12), attr_float("bias", 0.3)])
            .gen(Distinct),
        case("prelu_channel_slope", "PRelu", vec![x(&[2, 3, 4]), x(&[3, 1])]),
        case("reciprocal", "Reciprocal", vec![x(&[3, 4])]),
        case("sin", "Sin", vec![x(&[3, 4])]),
        case("cos", "Cos", vec![x(&[3, 4])]),
        case("tan", "Tan", vec![x(&[3, 4])]).gen(Unit),
        case("sinh", "Sinh", vec![x(&[3, 4])]),
        case("cosh", "Cosh", vec![x(&[3, 4])]),
        case("asin", "Asin", vec![x(&[3, 4])]).gen(Unit),
        case("acos", "Acos", vec![x(&[3, 4])]).gen(Unit),
        case("atan", "Atan", vec![x(&[3, 4])]),
        case("asinh", "Asinh", vec![x(&[3, 4])]),
        case("acosh", "Acosh", vec![x(&[3, 4])]).gen(AboveOne),
        case("atanh", "Atanh", vec![x(&[3, 4])]).gen(Unit),
        case("mean3", "Mean", vec![x(&[2, 3]), x(&[3]), x(&[2, 1])]),
    ]
}
