//! Control flow (If, Loop, Scan: the facts their bodies declare), quantization, and the ops
//! whose output size depends on the data (Compress, NonMaxSuppression).

use super::{axis, Node, Rule};
use crate::dim::Dim;
use crate::dtype;
use crate::index::ValueFact;
use crate::proto::GraphProto;

pub(super) const RULES: &[(&[&str], Rule)] = &[
    (&["If"], if_),
    (&["Loop"], loop_),
    (&["Scan"], scan),
    (&["QuantizeLinear"], quantize),
    (&["DequantizeLinear"], dequantize),
    (&["Compress"], compress),
    (&["NonMaxSuppression"], non_max_suppression),
];

fn body<'a>(c: &Node<'a>, name: &str) -> Option<&'a GraphProto> {
    crate::attr::attr(c.n, name).and_then(|a| a.g.as_ref())
}

/// The facts a body declares for its outputs (symbolic names there are the body's own, so
/// only known dims are kept).
fn declared(g: &GraphProto) -> Vec<Option<ValueFact>> {
    g.output
        .iter()
        .map(|v| {
            let f = v.type_.as_ref().and_then(ValueFact::from_type_proto)?;
            let shape = f.shape.map(|s| {
                s.into_iter()
                    .map(|d| if d.known().is_some() { d } else { Dim::Unknown })
                    .collect()
            });
            Some(ValueFact { dtype: f.dtype, shape })
        })
        .collect()
}

/// If: where both branches declare an output, its type, and the dims they agree on.
fn if_(c: &mut Node) -> Option<()> {
    let (t, e) = (declared(body(c, "then_branch")?), declared(body(c, "else_branch")?));
    for (o, (a, b)) in t.into_iter().zip(e).enumerate() {
        let (Some(a), Some(b)) = (a, b) else { continue };
        if a.dtype != b.dtype {
            continue;
        }
        let shape = match (a.shape, b.shape) {
            (Some(x), Some(y)) if x.len() == y.len() => Some(
                x.into_iter()
                    .zip(y)
                    .map(|(p, q)| if p == q { p } else { Dim::Unknown })
                    .collect(),
            ),
            _ => None,
        };
        c.set(o, a.dtype, shape);
    }
    Some(())
}

/// Loop: the loop-carried values as the body declares them (after its condition output), the
/// scan outputs with a leading dim of unknown length.
fn loop_(c: &mut Node) -> Option<()> {
    let outs = declared(body(c, "body")?);
    let carried = c.inputs().saturating_sub(2);
    for (o, f) in outs.into_iter().skip(1).enumerate() {
        let Some(f) = f else { continue };
        let shape = if o < carried {
            f.shape
        } else {
            f.shape.map(|s| std::iter::once(Dim::Unknown).chain(s).collect())
        };
        c.set(o, f.dtype, shape);
    }
    Some(())
}

/// Scan (opset 9 on): the states as declared by the body (or as their initial values), each
/// scan output the body's per-step fact with the scan length inserted at its axis.
fn scan(c: &mut Node) -> Option<()> {
    let outs = declared(body(c, "body")?);
    let scans = c.attr_i("num_scan_inputs", 0) as usize;
    let states = c.inputs().checked_sub(scans)?;
    let in_axes = c.attr_ints("scan_input_axes").unwrap_or_else(|| vec![0; scans]);
    let first = c.shape(states)?;
    let len = first.get(axis(*in_axes.first().unwrap_or(&0), first.len())?)?.clone();
    let out_axes = c.attr_ints("scan_output_axes").unwrap_or_default();
    for (o, f) in outs.into_iter().enumerate() {
        if o < states {
            match f {
                Some(f) => c.set(o, f.dtype, f.shape.or_else(|| c.shape(o))),
                None => c.same(o, o),
            }
            continue;
        }
        let Some(f) = f else { continue };
        let shape = f.shape.and_then(|mut s| {
            let a = *out_axes.get(o - states).unwrap_or(&0);
            let a = axis(a, s.len() + 1)?;
            s.insert(a, len.clone());
            Some(s)
        });
        c.set(o, f.dtype, shape);
    }
    Some(())
}

/// QuantizeLinear: X's shape; the zero point's type, else `output_dtype`, else uint8.
fn quantize(c: &mut Node) -> Option<()> {
    let dt = if c.has(2) {
        c.dtype(2)
    } else {
        match c.attr_i("output_dtype", 0) {
            0 => dtype::UINT8,
            d => d as i32,
        }
    };
    c.set(0, dt, c.shape(0));
    Some(())
}

/// DequantizeLinear: X's shape in the scale's type (or `output_dtype`).
fn dequantize(c: &mut Node) -> Option<()> {
    let dt = match c.attr_i("output_dtype", 0) {
        0 => c.dtype(1),
        d => d as i32,
    };
    c.set(0, dt, c.shape(0));
    Some(())
}

/// Compress: the selected length is only known at run time.
fn compress(c: &mut Node) -> Option<()> {
    let s = c.shape(0)?;
    // A condition known when the graph is built (a constant) selects a known count: its true
    // elements (the spec lets it be shorter than the axis, not longer).
    let selected = c
        .ints(1)
        .map(|v| Dim::Known(v.iter().filter(|&&b| b != 0).count() as i64))
        .unwrap_or(Dim::Unknown);
    let shape = match crate::attr::attr_i(c.n, "axis") {
        Some(a) => {
            let a = axis(a, s.len())?;
            let mut s = s;
            s[a] = selected;
            s
        }
        None => vec![selected],
    };
    c.set(0, c.dtype(0), Some(shape));
    Some(())
}

/// NonMaxSuppression: `[selected, 3]` int64 indices.
fn non_max_suppression(c: &mut Node) -> Option<()> {
    c.set(0, dtype::INT64, Some(vec![Dim::Unknown, Dim::Known(3)]));
    Some(())
}
