//! Models of opsets 6 to 15 read as opset 16, the first whose ScatterElements and ScatterND add
//! (the gradients of Gather, GatherElements, GatherND and MaxPool scatter so): the forms of the
//! operators whose signature changed before 16 (an attribute that became an input, Softmax's
//! flattening axis, Upsample and Resize-10 before Resize had coordinate modes, Scatter before
//! ScatterElements, BatchNormalization's training outputs before `training_mode`, RoiAlign's
//! coordinates, the experimental ImageScaler as Mul and Add, opset 6's element-wise broadcasting
//! by `broadcast` and `axis` attributes, its PRelu slope per channel and BatchNormalization's
//! `is_test`) rewritten as opset 16 writes them, each computing what the old form computed.
//! Every other operator reads the same at 16. tf2onnx (default opset 15), paddle2onnx (9),
//! PyTorch's legacy exporter before 2.1 (14) and the ONNX model zoo write such models, and
//! `onnx.version_converter` fails on common ones (a BatchNormalization exported in training
//! mode). Subgraphs (If, Loop, Scan bodies) are rewritten too.
//!
//! Each rewrite is checked against ONNX Runtime running the old form (`upgrade_cases` in
//! tests/it/upgrade.rs), and real PyTorch exports at opsets 9 to 14 train to PyTorch's gradients
//! (`models/old_opset/`).

use crate::schema_version;
use dagr_onnx::attr;
use dagr_onnx::builder::{attr_int, attr_string, Builder};
use dagr_onnx::error::{Error, Result};
use dagr_onnx::proto::{AttributeProto, NodeProto};
use dagr_onnx::{dtype, GraphIndex, Model};

/// The opset models are read at.
pub const TARGET: i64 = 16;

/// The oldest opset read. Opset 6 broadcasts element-wise by `broadcast` and `axis`
/// attributes, which are rewritten; before 6, operators kept `consumed_inputs` and other forms
/// not read here.
pub const OLDEST: i64 = 6;

/// Rewrite a model of default-domain opset 6 to 15 as opset 16 (`TARGET`), in place; its opset
/// import says 16 afterwards. Returns the opset it had, None where it was 16 or newer already
/// (or declares none). Idempotent.
pub fn upgrade(model: &mut Model) -> Result<Option<i64>> {
    let from = model.opset();
    if from >= TARGET || from == 0 {
        return Ok(None);
    }
    if from < OLDEST {
        return Err(Error::Config(format!(
            "the model uses opset {from}; dagr-inject reads opsets {OLDEST} and newer\n  hint: convert it with onnx.version_converter.convert_version(model, 16)"
        )));
    }
    let idx = crate::index(model).ok();
    let mut b = Builder::new(model, "upgrade/");
    b.opset = TARGET;
    let read = Read::of(model);
    let mut up = Upgrade { from, b, idx, read };
    let nodes = std::mem::take(&mut model.graph_mut().node);
    let nodes = up.nodes(nodes)?;
    let g = model.graph_mut();
    g.node = nodes;
    g.initializer.extend(up.b.initializers);
    for o in model.proto.opset_import.iter_mut() {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = TARGET;
        }
    }
    // The IR version that opset 16 came with (older IRs predate its operators' types).
    model.proto.ir_version = model.proto.ir_version.max(8);
    Ok(Some(from))
}

struct Upgrade {
    from: i64,
    b: Builder,
    /// The model's facts as declared and inferred at its own opset (types, ranks, constants).
    idx: Option<GraphIndex>,
    read: Read,
}

/// Every tensor some node (in any subgraph) or the graph's outputs read.
struct Read(std::collections::HashSet<String>);

impl Read {
    fn of(model: &Model) -> Read {
        fn walk(g: &dagr_onnx::proto::GraphProto, out: &mut std::collections::HashSet<String>) {
            out.extend(g.output.iter().map(|o| o.name.clone()));
            for n in &g.node {
                out.extend(n.input.iter().cloned());
                for a in &n.attribute {
                    a.g.iter().chain(&a.graphs).for_each(|sg| walk(sg, out));
                }
            }
        }
        let mut out = std::collections::HashSet::new();
        walk(model.graph(), &mut out);
        Read(out)
    }
    fn contains_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| !n.is_empty() && self.0.contains(n))
    }
}

fn refuse(n: &NodeProto, why: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "{} node '{}' cannot be read at opset {TARGET}: {why}\n  hint: re-export the model with opset 16 or newer",
        n.op_type, n.name
    ))
}

/// The node without the attributes named.
fn without(mut n: NodeProto, names: &[&str]) -> NodeProto {
    n.attribute.retain(|a| !names.contains(&a.name.as_str()));
    n
}

impl Upgrade {
    /// Each node rewritten (subgraphs first), in order.
    fn nodes(&mut self, nodes: Vec<NodeProto>) -> Result<Vec<NodeProto>> {
        let mut out = Vec::with_capacity(nodes.len());
        for mut n in nodes {
            for a in n.attribute.iter_mut() {
                if let Some(g) = a.g.as_mut() {
                    g.node = self.nodes(std::mem::take(&mut g.node))?;
                }
                for g in a.graphs.iter_mut() {
                    g.node = self.nodes(std::mem::take(&mut g.node))?;
                }
            }
            let n = if n.domain.is_empty() || n.domain == "ai.onnx" {
                self.node(n)?
            } else {
                n
            };
            out.append(&mut self.b.nodes);
            out.push(n);
        }
        Ok(out)
    }

    /// The node's schema version in the model as given.
    fn version(&self, n: &NodeProto) -> i64 {
        schema_version(&n.op_type, self.from).unwrap_or(0)
    }

    fn ints_input(&mut self, v: &[i64]) -> String {
        self.b.const_i64(v)
    }

    /// An attribute of ints made the input at `slot` (the inputs before it kept, missing ones
    /// empty), the attribute removed.
    fn attr_to_input(&mut self, mut n: NodeProto, name: &str, slot: usize) -> NodeProto {
        if let Some(v) = attr::attr_ints(&n, name) {
            let c = self.ints_input(&v);
            set_input(&mut n, slot, c);
        }
        without(n, &[name])
    }

    /// A tensor's rank, where the model's facts know it.
    fn rank(&self, t: &str) -> Option<i64> {
        self.idx
            .as_ref()
            .and_then(|i| i.fact(t))
            .and_then(|f| f.rank())
            .map(|r| r as i64)
    }

    fn elem_type(&self, t: &str) -> i32 {
        self.idx
            .as_ref()
            .and_then(|i| i.fact(t))
            .map(|f| f.dtype)
            .filter(|&d| dtype::is_float(d))
            .unwrap_or(dtype::FLOAT)
    }

    fn node(&mut self, n: NodeProto) -> Result<NodeProto> {
        let v = self.version(&n);
        Ok(match n.op_type.as_str() {
            "Slice" if v < 10 => {
                let (starts, ends) = (attr::attr_ints(&n, "starts"), attr::attr_ints(&n, "ends"));
                let (Some(starts), Some(ends)) = (starts, ends) else {
                    return Err(refuse(&n, "its starts or ends attribute is missing"));
                };
                let axes = attr::attr_ints(&n, "axes");
                let mut n = without(n, &["starts", "ends", "axes"]);
                n.input.truncate(1);
                let s = self.ints_input(&starts);
                let e = self.ints_input(&ends);
                n.input.extend([s, e]);
                if let Some(a) = axes {
                    let a = self.ints_input(&a);
                    n.input.push(a);
                }
                n
            }
            "Squeeze" | "Unsqueeze" | "ReduceSum" if v < 13 => self.attr_to_input(n, "axes", 1),
            "Split" if v < 13 => self.attr_to_input(n, "split", 1),
            "TopK" if v < 10 => {
                let Some(k) = attr::attr_i(&n, "k") else {
                    return Err(refuse(&n, "its k attribute is missing"));
                };
                let k = self.ints_input(&[k]);
                let mut n = without(n, &["k"]);
                set_input(&mut n, 1, k);
                n
            }
            "Pad" if v < 11 => {
                let Some(pads) = attr::attr_ints(&n, "pads") else {
                    return Err(refuse(&n, "its pads attribute is missing"));
                };
                let value = attr::attr_f(&n, "value").unwrap_or(0.0);
                let t = self.elem_type(&n.input[0]);
                let p = self.ints_input(&pads);
                let mut n = without(n, &["pads", "value"]);
                set_input(&mut n, 1, p);
                if value != 0.0 {
                    let c = self.b.scalar_of(value as f64, t);
                    set_input(&mut n, 2, c);
                }
                n
            }
            "Clip" if v < 11 => {
                let t = self.elem_type(&n.input[0]);
                let (lo, hi) = (attr::attr_f(&n, "min"), attr::attr_f(&n, "max"));
                let mut n = without(n, &["min", "max"]);
                if let Some(lo) = lo {
                    let c = self.b.scalar_of(lo as f64, t);
                    set_input(&mut n, 1, c);
                }
                if let Some(hi) = hi {
                    let c = self.b.scalar_of(hi as f64, t);
                    set_input(&mut n, 2, c);
                }
                n
            }
            "Dropout" if v < 12 => {
                // Before 12 the runtime decided training; a model runs it as the identity, as
                // opset 12's Dropout without training_mode does.
                let ratio = attr::attr_f(&n, "ratio");
                let mut n = without(n, &["ratio", "is_test"]);
                if let Some(r) = ratio {
                    let c = self.b.scalar_of(r as f64, dtype::FLOAT);
                    set_input(&mut n, 1, c);
                }
                n
            }
            "Softmax" | "LogSoftmax" | "Hardmax" if v < 13 => self.flattening_axis(n)?,
            "Upsample" => {
                let scales = match (v, n.input.get(1).filter(|s| !s.is_empty())) {
                    (9.., Some(s)) => s.clone(),
                    _ => {
                        let Some(s) = attr::attr(&n, "scales").map(|a| a.floats.clone()) else {
                            return Err(refuse(&n, "its scales are missing"));
                        };
                        let dims = [s.len() as i64];
                        let vals: Vec<f64> = s.iter().map(|&x| x as f64).collect();
                        let name = self.b.name("scales");
                        self.b
                            .initializers
                            .push(dagr_onnx::tensor::float_tensor(&name, &dims, &vals, dtype::FLOAT));
                        name
                    }
                };
                let mut n = without(n, &["scales"]);
                n.op_type = "Resize".into();
                n.input.truncate(1);
                n.input.extend([String::new(), scales]);
                self.old_resize(n, true)?
            }
            "Resize" if v < 11 => {
                let Some(scales) = n.input.get(1).cloned() else {
                    return Err(refuse(&n, "its scales input is missing"));
                };
                let mut n = n;
                n.input.truncate(1);
                n.input.extend([String::new(), scales]);
                self.old_resize(n, false)?
            }
            "Scatter" => {
                let mut n = n;
                n.op_type = "ScatterElements".into();
                n
            }
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Xor" | "Equal" | "Greater" | "Less" if v < 7 => {
                self.attribute_broadcast(n)?
            }
            "Gemm" if v < 7 => without(n, &["broadcast"]),
            "PRelu" if v < 7 => {
                // Opset 6's slope of one value per channel meets X's axis 1; from 7 it
                // broadcasts from the end: its trailing dims made 1.
                match (self.rank(&n.input[0]), self.rank(&n.input[1])) {
                    (Some(rx), Some(1)) if rx > 2 => {
                        let mut n = n;
                        let axes: Vec<i64> = (1..rx - 1).collect();
                        let hint = format!("{}/slope", n.name);
                        n.input[1] = self.b.unsqueeze(&n.input[1], &axes, &hint);
                        n
                    }
                    (Some(_), Some(_)) => n,
                    _ => return Err(refuse(&n, "its input and slope ranks are unknown")),
                }
            }
            "BatchNormalization" if v < 14 => {
                if attr::attr_i(&n, "spatial") == Some(0) {
                    return Err(refuse(&n, "spatial=0 (statistics per element) has no later form"));
                }
                // Opset 6 said inference by `is_test`: its other outputs are then not computed.
                let inference = attr::attr_i(&n, "is_test") == Some(1);
                let mut n = without(n, &["spatial", "is_test", "consumed_inputs"]);
                if inference {
                    if self.read.contains_any(&n.output[1..]) {
                        return Err(refuse(
                            &n,
                            "the model reads a statistic output of an inference-mode BatchNormalization",
                        ));
                    }
                    n.output.truncate(1);
                }
                // Before 14 the outputs said the mode: more than Y, training (the running
                // statistics, then the saved batch statistics, which 14 no longer gives).
                let trailing = |n: &NodeProto| n.output.last().is_some_and(String::is_empty);
                while trailing(&n) {
                    n.output.pop();
                }
                if n.output.len() > 1 {
                    if n.output.len() > 3 && self.read.contains_any(&n.output[3..]) {
                        return Err(refuse(
                            &n,
                            "the model reads its saved batch mean or variance, which opset 14 has no output for",
                        ));
                    }
                    n.output.truncate(3);
                    n.attribute.push(attr_int("training_mode", 1));
                }
                n
            }
            "RoiAlign" if v < 16 => {
                // Opset 16 added the coordinate mode, its default half_pixel; 10 shifted none.
                let mut n = without(n, &["coordinate_transformation_mode"]);
                n.attribute
                    .push(attr_string("coordinate_transformation_mode", "output_half_pixel"));
                n
            }
            "Scan" if v < 9 => return Err(refuse(&n, "opset 8's Scan (a batch axis) has no later form")),
            // An experimental op of opsets 1 to 9 (old converters' image preprocessing, in ONNX
            // model zoo models): scale x + bias[c] over NCHW.
            "ImageScaler" => {
                let t = self.elem_type(&n.input[0]);
                let scale = attr::attr_f(&n, "scale").unwrap_or(1.0);
                let bias: Vec<f64> = attr::attr(&n, "bias")
                    .map(|a| a.floats.iter().map(|&x| x as f64).collect())
                    .unwrap_or_default();
                let hint = format!("{}/imagescaler", n.name);
                let s = self.b.scalar_of(scale as f64, t);
                let scaled = self.b.op("Mul", &[&n.input[0], &s], vec![], &hint);
                let name = self.b.name(&format!("{hint}/bias"));
                let dims = [1, bias.len() as i64, 1, 1];
                self.b
                    .initializers
                    .push(dagr_onnx::tensor::float_tensor(&name, &dims, &bias, t));
                NodeProto {
                    op_type: "Add".into(),
                    name: n.name.clone(),
                    input: vec![scaled, name],
                    output: vec![n.output[0].clone()],
                    ..Default::default()
                }
            }
            _ => n,
        })
    }

    /// An element-wise op of opset 6: `broadcast=1` with an `axis` aligns B's dims with A's from
    /// that axis (B gets trailing 1s: an Unsqueeze, ranks known); without `axis` it aligns them
    /// at the end, as opset 7's broadcasting does; `broadcast=0` has equal shapes.
    fn attribute_broadcast(&mut self, n: NodeProto) -> Result<NodeProto> {
        let axis = attr::attr_i(&n, "axis");
        let broadcast = attr::attr_i(&n, "broadcast") == Some(1);
        let mut n = without(n, &["broadcast", "axis"]);
        let Some(axis) = axis.filter(|_| broadcast) else {
            return Ok(n);
        };
        let (Some(ra), Some(rb)) = (self.rank(&n.input[0]), self.rank(&n.input[1])) else {
            return Err(refuse(&n, "it broadcasts by an axis over inputs of unknown rank"));
        };
        let axis = if axis < 0 { axis + ra } else { axis };
        let trailing = ra - axis - rb;
        if trailing > 0 {
            let axes: Vec<i64> = (rb..rb + trailing).collect();
            let hint = format!("{}/broadcast", n.name);
            n.input[1] = self.b.unsqueeze(&n.input[1], &axes, &hint);
        }
        Ok(n)
    }

    /// Softmax, LogSoftmax and Hardmax before 13 normalize the input flattened to 2-D at `axis`
    /// (default 1): the same op over the last axis where `axis` is it, else Flatten, the op over
    /// the flattened axis, Reshape back.
    fn flattening_axis(&mut self, n: NodeProto) -> Result<NodeProto> {
        let axis = attr::attr_i(&n, "axis").unwrap_or(1);
        let last = match self.rank(&n.input[0]) {
            Some(r) => axis == -1 || axis == r - 1,
            None => axis == -1,
        };
        let mut n = without(n, &["axis"]);
        if last {
            n.attribute.push(attr_int("axis", -1));
            return Ok(n);
        }
        let x = n.input[0].clone();
        let hint = format!("{}/{}", n.name, n.op_type.to_lowercase());
        let flat = self.b.op("Flatten", &[&x], vec![attr_int("axis", axis)], &hint);
        let out = n.output[0].clone();
        let normalized = self.b.name(&format!("{hint}/normalized"));
        n.input[0] = flat;
        n.output[0] = normalized.clone();
        n.attribute.push(attr_int("axis", -1));
        // The op node itself goes before the Reshape: pushed as the builder's last node, and
        // the Reshape returned in its place.
        self.b.nodes.push(n);
        let shape = self.b.op("Shape", &[&x], vec![], &hint);
        Ok(NodeProto {
            op_type: "Reshape".into(),
            name: self.b.name(&format!("{hint}/reshape")),
            input: vec![normalized, shape],
            output: vec![out],
            ..Default::default()
        })
    }

    /// A Resize of (X, "", scales) with the coordinates of Upsample and Resize-10: asymmetric,
    /// nearest rounding down (up where every resized axis shrinks, as ONNX Runtime rounds those
    /// versions: the scales must then be known, or be Upsample's, which are at least 1).
    fn old_resize(&mut self, mut n: NodeProto, upsample: bool) -> Result<NodeProto> {
        let mode = attr::attr_s(&n, "mode").unwrap_or_else(|| "nearest".into());
        let mode = match mode.as_str() {
            "nearest" => "nearest",
            "linear" | "bilinear" => "linear",
            other => return Err(refuse(&n, format!("mode '{other}' is not one the spec defines"))),
        };
        let mut attrs: Vec<AttributeProto> = vec![
            attr_string("mode", mode),
            attr_string("coordinate_transformation_mode", "asymmetric"),
        ];
        if mode == "nearest" {
            let scales = self.idx.as_ref().and_then(|i| i.float_constant(&n.input[2]));
            let rounding = match scales {
                Some(s) if s.iter().all(|&v| v >= 1.0) => "floor",
                Some(s) if s.iter().all(|&v| v <= 1.0) => "ceil",
                Some(_) => return Err(refuse(&n, "nearest resizing that grows some axes and shrinks others")),
                None if upsample => "floor",
                None => return Err(refuse(&n, "nearest resizing by scales computed at run time")),
            };
            attrs.push(attr_string("nearest_mode", rounding));
        }
        n.attribute = attrs;
        Ok(n)
    }
}

/// Input `slot` of `n` set to `name`, empty inputs filling the slots before it.
fn set_input(n: &mut NodeProto, slot: usize, name: String) {
    if n.input.len() <= slot {
        n.input.resize(slot + 1, String::new());
    }
    n.input[slot] = name;
}
