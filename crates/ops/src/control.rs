//! Control flow and quantization: inference only (no gradient rules yet).

use crate::Kind::NoRule;
use crate::{op, Op};

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "DequantizeLinear",
        10,
        Some(shapes::dequantize),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "If",
        1,
        Some(shapes::if_),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "Loop",
        1,
        Some(shapes::loop_),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "NonMaxSuppression",
        10,
        Some(shapes::non_max_suppression),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "QuantizeLinear",
        10,
        Some(shapes::quantize),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
    op(
        "Scan",
        8,
        Some(shapes::scan),
        NoRule,
        "no gradient rule: differentiating through it is refused",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::axis;
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;
    use dagr_onnx::dtype;
    use dagr_onnx::index::ValueFact;
    use dagr_onnx::proto::GraphProto;

    pub(crate) fn body<'a>(c: &Node<'a>, name: &str) -> Option<&'a GraphProto> {
        dagr_onnx::attr::attr(c.n, name).and_then(|a| a.g.as_ref())
    }

    /// The facts a body declares for its outputs (symbolic names there are the body's own, so
    /// only known dims are kept).
    pub(crate) fn declared(g: &GraphProto) -> Vec<Option<ValueFact>> {
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
    pub(crate) fn if_(c: &mut Node) -> Option<()> {
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
    pub(crate) fn loop_(c: &mut Node) -> Option<()> {
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
    pub(crate) fn scan(c: &mut Node) -> Option<()> {
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
    pub(crate) fn quantize(c: &mut Node) -> Option<()> {
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
    pub(crate) fn dequantize(c: &mut Node) -> Option<()> {
        let dt = match c.attr_i("output_dtype", 0) {
            0 => c.dtype(1),
            d => d as i32,
        };
        c.set(0, dt, c.shape(0));
        Some(())
    }

    /// NonMaxSuppression: `[selected, 3]` int64 indices.
    pub(crate) fn non_max_suppression(c: &mut Node) -> Option<()> {
        c.set(0, dtype::INT64, Some(vec![Dim::Unknown, Dim::Known(3)]));
        Some(())
    }
}
