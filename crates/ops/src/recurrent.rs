//! RNN, GRU and LSTM. The forward keeps the fused op. The backward, per direction:
//!
//! 1. the preliminaries, in the outer graph: X W^T plus the biases for every step at once, the
//!    recurrent weights transposed and split per gate, the initial states;
//! 2. a forward `Scan` recomputing the state before each step (the fused op does not output the
//!    LSTM cell states, nor the states in `sequence_lens` form);
//! 3. a backward `Scan` over time whose body is one cell, written as the ONNX spec writes it
//!    (MatMul, Add, Mul, the cell's activations) and differentiated by the engine: it carries
//!    the state gradients and sums the recurrent weights' gradients;
//! 4. the engine differentiates the preliminaries from what the Scan returns.
//!
//! The graph does not grow with the sequence, whose length may be symbolic. Covered: both
//! directions and `bidirectional`, `layout` 0 and 1, initial states (absent: zeros),
//! `sequence_lens` (a step past a sequence's length keeps its state and outputs zeros), `clip`,
//! `linear_before_reset` (GRU), `input_forget` and peepholes (LSTM), and every activation the
//! spec lists with its `activation_alpha` / `activation_beta`.

use super::Out;
use crate::ctx::Ctx;
use crate::Kind::Vjp;
use crate::{op, Op};
use dagr_onnx::builder::{attr_float, attr_graph, attr_int, attr_ints, attr_tensor, Builder};
use dagr_onnx::error::Result;
use dagr_onnx::proto::GraphProto;
use dagr_onnx::{dtype, Dim, ValueFact};

/// This family's operators, each one entry: name, the first schema version covered, shape
/// inference, gradient, formula.
pub(crate) static OPS: &[Op] = &[
    op(
        "RNN",
        7,
        Some(shapes::recurrent),
        Vjp(rnn),
        "a backward Scan over time whose body is the ONNX cell, differentiated",
    ),
    op(
        "GRU",
        7,
        Some(shapes::recurrent),
        Vjp(gru),
        "a backward Scan over time whose body is the ONNX cell, differentiated",
    ),
    op(
        "LSTM",
        7,
        Some(shapes::recurrent),
        Vjp(lstm),
        "a backward Scan over time whose body is the ONNX cell, differentiated",
    ),
];

/// Shape (and value) inference of this family's operators.
pub(crate) mod shapes {
    use crate::infer::Node;
    use dagr_onnx::dim::Dim;

    /// RNN, GRU, LSTM: `Y` is `[seq, dirs, batch, hidden]` (`layout=1`: `[batch, seq, dirs,
    /// hidden]`), the last states `[dirs, batch, hidden]` (`[batch, dirs, hidden]`).
    pub(crate) fn recurrent(c: &mut Node) -> Option<()> {
        let x = c.shape(0)?;
        if x.len() != 3 {
            return None;
        }
        let hidden = Dim::Known(c.attr_i("hidden_size", 0));
        let dirs = Dim::Known(if c.attr_s("direction").as_deref() == Some("bidirectional") {
            2
        } else {
            1
        });
        let batch_first = c.attr_i("layout", 0) == 1;
        let (seq, batch) = if batch_first { (&x[1], &x[0]) } else { (&x[0], &x[1]) };
        let dt = c.dtype(0);
        let (y, state) = if batch_first {
            (
                vec![batch.clone(), seq.clone(), dirs.clone(), hidden.clone()],
                vec![batch.clone(), dirs, hidden],
            )
        } else {
            (
                vec![seq.clone(), dirs.clone(), batch.clone(), hidden.clone()],
                vec![dirs, batch.clone(), hidden],
            )
        };
        c.set(0, dt, Some(y));
        for o in 1..c.outputs() {
            c.set(o, dt, Some(state.clone()));
        }
        Some(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Cell {
    Rnn,
    Gru,
    Lstm,
}

impl Cell {
    fn gates(self) -> i64 {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }
    fn default_activations(self) -> &'static [&'static str] {
        match self {
            Cell::Rnn => &["Tanh"],
            Cell::Gru => &["Sigmoid", "Tanh"],
            Cell::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        }
    }
}

pub fn rnn(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    vjp(c, g, need, Cell::Rnn)
}
pub fn gru(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    vjp(c, g, need, Cell::Gru)
}
pub fn lstm(c: &mut Ctx, g: &[Option<String>], need: &[bool]) -> Out {
    vjp(c, g, need, Cell::Lstm)
}

/// One activation with its parameters (the spec's defaults where the node gives none).
#[derive(Clone)]
struct Act {
    name: String,
    alpha: f32,
    beta: f32,
}

/// The activations of each direction: `activations` lists the forward direction's then the
/// reverse's; `activation_alpha` / `activation_beta` are consumed in that order by the
/// activations that take them (as ONNX Runtime reads them).
fn activations(c: &Ctx, cell: Cell, dirs: usize) -> Result<Vec<Vec<Act>>> {
    let per = cell.default_activations().len();
    let given: Vec<String> = dagr_onnx::attr::attr(c.node, "activations")
        .map(|a| {
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let names: Vec<String> = if given.is_empty() {
        (0..dirs)
            .flat_map(|_| cell.default_activations().iter().map(|s| s.to_string()))
            .collect()
    } else if given.len() == per * dirs {
        given
    } else if given.len() == per {
        (0..dirs).flat_map(|_| given.clone()).collect()
    } else {
        return Err(c.err(format!(
            "it lists {} activations; a {}-direction node takes {}",
            given.len(),
            dirs,
            per * dirs
        )));
    };
    let floats = |n: &str| -> Vec<f32> {
        dagr_onnx::attr::attr(c.node, n)
            .map(|a| a.floats.clone())
            .unwrap_or_default()
    };
    let (alphas, betas) = (floats("activation_alpha"), floats("activation_beta"));
    let (mut ai, mut bi) = (alphas.iter(), betas.iter());
    let mut acts = Vec::new();
    for n in names {
        let lower = n.to_lowercase();
        let (da, db, uses_a, uses_b) = match lower.as_str() {
            "sigmoid" | "tanh" | "relu" | "softsign" | "softplus" => (0.0, 0.0, false, false),
            "leakyrelu" => (0.01, 0.0, true, false),
            "thresholdedrelu" | "elu" => (1.0, 0.0, true, false),
            "hardsigmoid" => (0.2, 0.5, true, true),
            "affine" => (1.0, 0.0, true, true),
            "scaledtanh" => (1.0, 1.0, true, true),
            _ => return Err(c.err(format!("activation '{n}' is not one the ONNX spec lists"))),
        };
        let alpha = if uses_a { ai.next().copied().unwrap_or(da) } else { da };
        let beta = if uses_b { bi.next().copied().unwrap_or(db) } else { db };
        acts.push(Act {
            name: lower,
            alpha,
            beta,
        });
    }
    Ok(acts.chunks(per).map(<[Act]>::to_vec).collect())
}

impl Ctx<'_> {
    fn activate(&mut self, act: &Act, x: &str, clip: Option<f32>) -> String {
        let x = match clip {
            Some(k) => {
                let (lo, hi) = (self.scalar(-k as f64), self.scalar(k as f64));
                self.op("Clip", &[x, &lo, &hi])
            }
            None => x.to_string(),
        };
        let alpha = attr_float("alpha", act.alpha);
        match act.name.as_str() {
            "sigmoid" => self.op("Sigmoid", &[&x]),
            "tanh" => self.op("Tanh", &[&x]),
            "relu" => self.op("Relu", &[&x]),
            "softsign" => self.op("Softsign", &[&x]),
            "softplus" => self.op("Softplus", &[&x]),
            "leakyrelu" => self.op_a("LeakyRelu", &[&x], vec![alpha]),
            "thresholdedrelu" => self.op_a("ThresholdedRelu", &[&x], vec![alpha]),
            "elu" => self.op_a("Elu", &[&x], vec![alpha]),
            "hardsigmoid" => self.op_a("HardSigmoid", &[&x], vec![alpha, attr_float("beta", act.beta)]),
            "affine" => {
                let (a, b) = (self.scalar(act.alpha as f64), self.scalar(act.beta as f64));
                let ax = self.op("Mul", &[&x, &a]);
                self.op("Add", &[&ax, &b])
            }
            // scaledtanh: alpha tanh(beta x)
            _ => {
                let (a, b) = (self.scalar(act.alpha as f64), self.scalar(act.beta as f64));
                let bx = self.op("Mul", &[&x, &b]);
                let t = self.op("Tanh", &[&bx]);
                self.op("Mul", &[&t, &a])
            }
        }
    }

    /// Entry `d` of the leading axis of `t`, the axis dropped (`None` for an absent input).
    fn direction(&mut self, t: &str, d: usize) -> Option<String> {
        if t.is_empty() {
            return None;
        }
        let i = self.b.scalar_i64(d as i64);
        Some(self.op_a("Gather", &[t, &i], vec![attr_int("axis", 0)]))
    }
    fn transpose2(&mut self, t: &str) -> String {
        self.op_a("Transpose", &[t], vec![attr_ints("perm", &[1, 0])])
    }
    /// Float zeros of the given shape tensor.
    fn zeros_of_shape(&mut self, shape: &str) -> String {
        let z = dagr_onnx::tensor::f32_tensor("", &[1], &[0.0]);
        self.op_a("ConstantOfShape", &[shape], vec![attr_tensor("value", z)])
    }
    /// Dims `from..to` of `t`'s shape, as a 1-D int64 tensor.
    fn dims_of(&mut self, t: &str, from: i64, to: i64) -> String {
        let s = self.shape_of(t);
        let (a, b) = (self.ints(&[from]), self.ints(&[to]));
        self.op("Slice", &[&s, &a, &b])
    }
}

/// The node's settings.
struct Settings {
    cell: Cell,
    hidden: i64,
    reverse: Vec<bool>,
    layout: i64,
    clip: Option<f32>,
    acts: Vec<Vec<Act>>,
    batch: Dim,
    linear_before_reset: bool,
    input_forget: bool,
}

impl Settings {
    fn of(c: &Ctx, cell: Cell) -> Result<Settings> {
        let w = c.input(1);
        let ws = c.known_shape(w)?;
        let gates = cell.gates();
        let hidden = match c.attr_i("hidden_size", 0) {
            h if h > 0 => h,
            _ => ws.get(1).copied().unwrap_or(0) / gates,
        };
        if ws.len() != 3 || ws[1] != gates * hidden {
            return Err(c.err(format!(
                "W has shape {ws:?}; it should be [dirs, {gates} x {hidden}, input]"
            )));
        }
        let direction = c.attr_s("direction").unwrap_or_else(|| "forward".into());
        let reverse: Vec<bool> = match direction.as_str() {
            "forward" => vec![false],
            "reverse" => vec![true],
            "bidirectional" => vec![false, true],
            d => return Err(c.err(format!("direction '{d}' is not forward, reverse or bidirectional"))),
        };
        let layout = c.attr_i("layout", 0);
        let xs = c.shape(c.input(0))?;
        let batch = xs
            .get(if layout == 0 { 1 } else { 0 })
            .cloned()
            .ok_or_else(|| c.err("X must be [seq, batch, input]"))?;
        Ok(Settings {
            cell,
            hidden,
            acts: activations(c, cell, reverse.len())?,
            reverse,
            layout,
            clip: dagr_onnx::attr::attr(c.node, "clip").map(|a| a.f),
            batch,
            linear_before_reset: cell == Cell::Gru && c.attr_i("linear_before_reset", 0) != 0,
            input_forget: cell == Cell::Lstm && c.attr_i("input_forget", 0) != 0,
        })
    }
}

/// One direction's recurrent weights as the cell reads them, in the outer graph.
#[derive(Clone)]
struct Weights {
    /// R^T, `[hidden, gates x hidden]` (GRU: the update and reset gates only).
    rt: String,
    /// GRU: Rh^T and (with `linear_before_reset` and a bias) Rbh.
    rh_t: Option<String>,
    rbh: Option<String>,
    /// LSTM peepholes `[hidden]` each: input, output, forget.
    peep: Vec<String>,
}

impl Weights {
    /// (tensor, shape) of each weight, in a fixed order.
    fn all(&self, h: i64, gates: i64) -> Vec<(String, Vec<i64>)> {
        let mut v = vec![(self.rt.clone(), vec![h, gates * h])];
        if let Some(r) = &self.rh_t {
            v[0].1 = vec![h, 2 * h];
            v.push((r.clone(), vec![h, h]));
        }
        if let Some(b) = &self.rbh {
            v.push((b.clone(), vec![h]));
        }
        v.extend(self.peep.iter().map(|p| (p.clone(), vec![h])));
        v
    }
}

/// One direction's preliminaries in the outer graph.
struct Direction {
    /// X W^T plus the biases, `[seq, batch, gates x hidden]`.
    xw: String,
    w: Weights,
    h0: String,
    c0: Option<String>,
}

fn vjp(c: &mut Ctx, g: &[Option<String>], need: &[bool], cell: Cell) -> Out {
    if g.iter().all(Option::is_none) {
        return Ok(vec![None; need.len()]);
    }
    let s = Settings::of(c, cell)?;
    let (n0, i0) = (c.b.nodes.len(), c.b.initializers.len());
    let x0 = if s.layout == 0 {
        c.input(0).to_string()
    } else {
        let x = c.input(0).to_string();
        c.op_a("Transpose", &[&x], vec![attr_ints("perm", &[1, 0, 2])])
    };
    let state_input = |c: &mut Ctx, i: usize| -> Option<String> {
        let t = c.input(i).to_string();
        if t.is_empty() {
            None
        } else if s.layout == 0 {
            Some(t)
        } else {
            Some(c.op_a("Transpose", &[&t], vec![attr_ints("perm", &[1, 0, 2])]))
        }
    };
    let h_init = state_input(c, 5);
    let c_init = if cell == Cell::Lstm { state_input(c, 6) } else { None };
    let mut dirs = Vec::new();
    for d in 0..s.reverse.len() {
        dirs.push(preliminaries(c, &s, d, &x0, h_init.as_deref(), c_init.as_deref())?);
    }
    let prelims = (n0..c.b.nodes.len(), i0..c.b.initializers.len());

    let mask = match c.input(4) {
        "" => None,
        lens => {
            let lens = lens.to_string();
            Some(step_mask(c, &x0, &lens))
        }
    };
    let mut seeds = Vec::new();
    for (d, dir) in dirs.iter().enumerate() {
        let rev = s.reverse[d];
        let (h_prev, c_prev) = forward_states(c, &s, d, dir, mask.as_deref())?;
        let gy = output_gradient(c, &s, g, d, &dir.xw)?;
        let carries = final_state_gradients(c, &s, g, d, &dir.h0)?;
        let grads = backward_scan(
            c,
            &s,
            d,
            dir,
            &h_prev,
            c_prev.as_deref(),
            &gy,
            &carries,
            mask.as_deref(),
            rev,
        )?;
        seeds.extend(grads);
    }
    c.differentiate_emitted(prelims, &seeds, need)
}

/// X W^T + biases for every step, the recurrent weights, the initial states (zeros if absent).
fn preliminaries(
    c: &mut Ctx,
    s: &Settings,
    d: usize,
    x0: &str,
    h_init: Option<&str>,
    c_init: Option<&str>,
) -> Result<Direction> {
    let hd = s.hidden;
    let gh = s.cell.gates() * hd;
    let hint = c.hint();
    let (w, r, bias, peep) = (
        c.input(1).to_string(),
        c.input(2).to_string(),
        c.input(3).to_string(),
        c.input(7).to_string(),
    );
    let wd = c.direction(&w, d).unwrap_or_default();
    let wt = c.transpose2(&wd);
    let mut xw = c.op("MatMul", &[x0, &wt]);
    let rd = c.direction(&r, d).unwrap_or_default();
    let (rt, rh_t) = if s.cell == Cell::Gru {
        let p = c.b.split(&rd, 0, &[2 * hd, hd], &hint);
        (c.transpose2(&p[0]), Some(c.transpose2(&p[1])))
    } else {
        (c.transpose2(&rd), None)
    };
    let mut rbh = None;
    if let Some(bd) = c.direction(&bias, d) {
        let wb_rb = c.b.split(&bd, 0, &[gh, gh], &hint);
        xw = c.op("Add", &[&xw, &wb_rb[0]]);
        let rb = if s.linear_before_reset {
            // Rbh is applied inside the reset gate's product; the others add straight.
            let parts = c.b.split(&wb_rb[1], 0, &[2 * hd, hd], &hint);
            rbh = Some(parts[1].clone());
            let zeros = c.b.const_f32(&[hd], &vec![0.0; hd as usize]);
            c.op_a("Concat", &[&parts[0], &zeros], vec![attr_int("axis", 0)])
        } else {
            wb_rb[1].clone()
        };
        xw = c.op("Add", &[&xw, &rb]);
    }
    let peep = match c.direction(&peep, d) {
        Some(pd) => c.b.split(&pd, 0, &[hd, hd, hd], &hint),
        None => vec![],
    };
    let zeros_state = |c: &mut Ctx| {
        let b = c.dims_of(x0, 1, 2);
        let h = c.ints(&[hd]);
        let shape = c.op_a("Concat", &[&b, &h], vec![attr_int("axis", 0)]);
        c.zeros_of_shape(&shape)
    };
    let h0 = match h_init.and_then(|t| c.direction(t, d)) {
        Some(h) => h,
        None => zeros_state(c),
    };
    let c0 = match s.cell {
        Cell::Lstm => Some(match c_init.and_then(|t| c.direction(t, d)) {
            Some(h) => h,
            None => zeros_state(c),
        }),
        _ => None,
    };
    Ok(Direction {
        xw,
        w: Weights { rt, rh_t, rbh, peep },
        h0,
        c0,
    })
}

/// `[seq, batch, 1]`: whether step t lies within each sequence.
fn step_mask(c: &mut Ctx, x0: &str, lens: &str) -> String {
    let t = c.dims_of(x0, 0, 1);
    let t = c.op_a("Squeeze", &[&t], vec![]);
    let (zero, one) = (c.b.scalar_i64(0), c.b.scalar_i64(1));
    let steps = c.op("Range", &[&zero, &t, &one]);
    let steps = c.cast(&steps, dtype::INT32);
    let steps = c.unsqueeze(&steps, &[1]);
    let l = c.cast(lens, dtype::INT32);
    let l = c.unsqueeze(&l, &[0]);
    let within = c.op("Less", &[&steps, &l]);
    c.unsqueeze(&within, &[2])
}

/// One cell, emitted by `c`: the new hidden state and (LSTM) cell state, `[batch, hidden]`.
#[allow(clippy::too_many_arguments)]
fn cell_step(c: &mut Ctx, s: &Settings, d: usize, w: &Weights, xw: &str, h: &str, cs: &str) -> (String, String) {
    let hint = c.hint();
    let (acts, clip, hd) = (&s.acts[d], s.clip, s.hidden);
    let hr = c.op("MatMul", &[h, &w.rt]);
    match s.cell {
        Cell::Rnn => {
            let pre = c.op("Add", &[xw, &hr]);
            (c.activate(&acts[0], &pre, clip), String::new())
        }
        Cell::Gru => {
            let xg = c.b.split(xw, 1, &[hd, hd, hd], &hint);
            let hg = c.b.split(&hr, 1, &[hd, hd], &hint);
            let zp = c.op("Add", &[&xg[0], &hg[0]]);
            let z = c.activate(&acts[0], &zp, clip);
            let rp = c.op("Add", &[&xg[1], &hg[1]]);
            let r = c.activate(&acts[0], &rp, clip);
            let rh_t = w.rh_t.as_deref().unwrap_or_default();
            let inner = if s.linear_before_reset {
                let hh = c.op("MatMul", &[h, rh_t]);
                let hh = match &w.rbh {
                    Some(b) => c.op("Add", &[&hh, b]),
                    None => hh,
                };
                c.op("Mul", &[&r, &hh])
            } else {
                let rh = c.op("Mul", &[&r, h]);
                c.op("MatMul", &[&rh, rh_t])
            };
            let np = c.op("Add", &[&xg[2], &inner]);
            let n = c.activate(&acts[1], &np, clip);
            // H = n + z (h - n)
            let diff = c.op("Sub", &[h, &n]);
            let zd = c.op("Mul", &[&z, &diff]);
            (c.op("Add", &[&n, &zd]), String::new())
        }
        Cell::Lstm => {
            let pre = c.op("Add", &[xw, &hr]);
            let g = c.b.split(&pre, 1, &[hd, hd, hd, hd], &hint);
            let (pi, po, pf, pc) = (&g[0], &g[1], &g[2], &g[3]);
            let peep = |c: &mut Ctx, p: &str, k: usize, state: &str| -> String {
                match w.peep.get(k) {
                    Some(pk) => {
                        let m = c.op("Mul", &[pk, state]);
                        c.op("Add", &[p, &m])
                    }
                    None => p.to_string(),
                }
            };
            let ip = peep(c, pi, 0, cs);
            let i = c.activate(&acts[0], &ip, clip);
            let f = if s.input_forget {
                let one = c.scalar(1.0);
                c.op("Sub", &[&one, &i])
            } else {
                let fp = peep(c, pf, 2, cs);
                c.activate(&acts[0], &fp, clip)
            };
            let cand = c.activate(&acts[1], pc, clip);
            let fc = c.op("Mul", &[&f, cs]);
            let ic = c.op("Mul", &[&i, &cand]);
            let cn = c.op("Add", &[&fc, &ic]);
            let op_ = peep(c, po, 1, &cn);
            let o = c.activate(&acts[0], &op_, clip);
            let hc = c.activate(&acts[2], &cn, None);
            (c.op("Mul", &[&o, &hc]), cn)
        }
    }
}

/// A Scan node in the outer graph: `states` initial values, `scans` sequences (axis 0), all in
/// the same `reverse` direction; returns (final states, scan outputs).
#[allow(clippy::too_many_arguments)]
fn scan(
    c: &mut Ctx,
    body: GraphProto,
    states: &[String],
    scans: &[String],
    n_scan_out: usize,
    reverse: bool,
) -> (Vec<String>, Vec<String>) {
    let inputs: Vec<&str> = states.iter().chain(scans).map(String::as_str).collect();
    let dir = reverse as i64;
    let attrs = vec![
        attr_graph("body", body),
        attr_int("num_scan_inputs", scans.len() as i64),
        attr_ints("scan_input_directions", &vec![dir; scans.len()]),
        attr_ints("scan_output_directions", &vec![dir; n_scan_out]),
    ];
    let h = c.hint();
    let mut outs = c.b.node_n("Scan", &inputs, states.len() + n_scan_out, attrs, &h);
    let scanned = outs.split_off(states.len());
    (outs, scanned)
}

/// A Scan body's input or output (`ctx::body_value_info`).
fn value_info(name: &str, elem: i32, dims: Vec<Dim>) -> dagr_onnx::proto::ValueInfoProto {
    crate::ctx::body_value_info(name, &ValueFact::new(elem, dims))
}

/// The state before each step, `[seq, batch, hidden]` (and the LSTM cell state), recomputed by
/// a forward Scan in the direction of the cell.
fn forward_states(
    c: &mut Ctx,
    s: &Settings,
    d: usize,
    dir: &Direction,
    mask: Option<&str>,
) -> Result<(String, Option<String>)> {
    let mut bb = c.body_builder();
    let (b_, h_) = (s.batch.clone(), Dim::Known(s.hidden));
    let state = vec![b_.clone(), h_.clone()];
    let gh = Dim::Known(s.cell.gates() * s.hidden);
    let lstm = s.cell == Cell::Lstm;
    let h_in = bb.name("h_in");
    let c_in = bb.name("c_in");
    let xw_t = bb.name("xw_t");
    let m_t = bb.name("m_t");
    let (hn, cn) = {
        let mut cc = c.with_builder(&mut bb);
        let (hn, cn) = cell_step(&mut cc, s, d, &dir.w, &xw_t, &h_in, &c_in);
        match mask {
            Some(_) => {
                let h2 = cc.op("Where", &[&m_t, &hn, &h_in]);
                let c2 = if lstm { cc.op("Where", &[&m_t, &cn, &c_in]) } else { cn };
                (h2, c2)
            }
            None => (hn, cn),
        }
    };
    let hp = bb.op("Identity", &[&h_in], vec![], "grad/scan");
    let cp = lstm.then(|| bb.op("Identity", &[&c_in], vec![], "grad/scan"));
    let mut g = GraphProto::new();
    g.name = bb.name("forward_states");
    g.input.push(value_info(&h_in, dtype::FLOAT, state.clone()));
    if lstm {
        g.input.push(value_info(&c_in, dtype::FLOAT, state.clone()));
    }
    g.input.push(value_info(&xw_t, dtype::FLOAT, vec![b_.clone(), gh]));
    if mask.is_some() {
        g.input
            .push(value_info(&m_t, dtype::BOOL, vec![b_.clone(), Dim::Known(1)]));
    }
    g.output.push(value_info(&hn, dtype::FLOAT, state.clone()));
    if lstm {
        g.output.push(value_info(&cn, dtype::FLOAT, state.clone()));
    }
    g.output.push(value_info(&hp, dtype::FLOAT, state.clone()));
    if let Some(cp) = &cp {
        g.output.push(value_info(cp, dtype::FLOAT, state.clone()));
    }
    c.b.names = bb.names.clone();
    g.node = bb.nodes;
    g.initializer = bb.initializers;
    let mut states = vec![dir.h0.clone()];
    states.extend(dir.c0.clone());
    let mut scans = vec![dir.xw.clone()];
    scans.extend(mask.map(String::from));
    let (_, seqs) = scan(c, g, &states, &scans, if lstm { 2 } else { 1 }, s.reverse[d]);
    Ok((seqs[0].clone(), seqs.get(1).cloned()))
}

/// The gradient reaching Y for direction `d`, `[seq, batch, hidden]` (zeros if none).
fn output_gradient(c: &mut Ctx, s: &Settings, g: &[Option<String>], d: usize, xw: &str) -> Result<String> {
    let i = c.b.scalar_i64(d as i64);
    Ok(match g.first().and_then(|x| x.clone()) {
        Some(gy) if s.layout == 0 => c.op_a("Gather", &[&gy, &i], vec![attr_int("axis", 1)]),
        Some(gy) => {
            let t = c.op_a("Gather", &[&gy, &i], vec![attr_int("axis", 2)]);
            c.op_a("Transpose", &[&t], vec![attr_ints("perm", &[1, 0, 2])])
        }
        None => {
            let sb = c.dims_of(xw, 0, 2);
            let h = c.ints(&[s.hidden]);
            let shape = c.op_a("Concat", &[&sb, &h], vec![attr_int("axis", 0)]);
            c.zeros_of_shape(&shape)
        }
    })
}

/// The gradients reaching Y_h (and Y_c) for direction `d`, `[batch, hidden]` (zeros if none):
/// the state gradients the backward Scan starts from.
fn final_state_gradients(c: &mut Ctx, s: &Settings, g: &[Option<String>], d: usize, h0: &str) -> Result<Vec<String>> {
    let i = c.b.scalar_i64(d as i64);
    let axis = if s.layout == 0 { 0 } else { 1 };
    let n = if s.cell == Cell::Lstm { 2 } else { 1 };
    let mut out = Vec::new();
    for k in 1..=n {
        out.push(match g.get(k).and_then(|x| x.clone()) {
            Some(gk) => c.op_a("Gather", &[&gk, &i], vec![attr_int("axis", axis)]),
            None => c.zeros_like(h0),
        });
    }
    Ok(out)
}

/// The backward Scan of direction `d`: returns the seeds for the preliminaries (each tensor
/// with its gradient): X W^T + biases per step, the recurrent weights, the initial states.
#[allow(clippy::too_many_arguments)]
fn backward_scan(
    c: &mut Ctx,
    s: &Settings,
    d: usize,
    dir: &Direction,
    h_prev: &str,
    c_prev: Option<&str>,
    gy: &str,
    carries: &[String],
    mask: Option<&str>,
    reverse: bool,
) -> Result<Vec<(String, String)>> {
    let lstm = s.cell == Cell::Lstm;
    let (b_, h_) = (s.batch.clone(), Dim::Known(s.hidden));
    let state = vec![b_.clone(), h_.clone()];
    let gh = Dim::Known(s.cell.gates() * s.hidden);
    let weights = dir.w.all(s.hidden, s.cell.gates());
    let mut bb = c.body_builder();
    // Body inputs: state gradients, weight-gradient sums, then the step's slices.
    let dh_in = bb.name("dh_in");
    let dc_in = bb.name("dc_in");
    let acc_in: Vec<String> = weights.iter().map(|_| bb.name("dw_in")).collect();
    let (xw_t, h_t, c_t, gy_t, m_t) = (
        bb.name("xw_t"),
        bb.name("h_t"),
        bb.name("c_t"),
        bb.name("gy_t"),
        bb.name("m_t"),
    );
    // The cell, with its masked update, as a graph of its own for the engine.
    let (h_out, c_out, y) = {
        let mut cc = c.with_builder(&mut bb);
        let (hn, cn) = cell_step(&mut cc, s, d, &dir.w, &xw_t, &h_t, &c_t);
        match mask {
            Some(_) => {
                let zero = cc.scalar(0.0);
                let y = cc.op("Where", &[&m_t, &hn, &zero]);
                let h2 = cc.op("Where", &[&m_t, &hn, &h_t]);
                let c2 = if lstm { cc.op("Where", &[&m_t, &cn, &c_t]) } else { cn };
                (h2, c2, y)
            }
            None => (hn.clone(), cn, hn),
        }
    };
    let mut cell_inputs = vec![
        (xw_t.clone(), ValueFact::new(dtype::FLOAT, vec![b_.clone(), gh.clone()])),
        (h_t.clone(), ValueFact::new(dtype::FLOAT, state.clone())),
    ];
    if lstm {
        cell_inputs.push((c_t.clone(), ValueFact::new(dtype::FLOAT, state.clone())));
    }
    if mask.is_some() {
        cell_inputs.push((
            m_t.clone(),
            ValueFact::new(dtype::BOOL, vec![b_.clone(), Dim::Known(1)]),
        ));
    }
    for (w, shape) in &weights {
        cell_inputs.push((
            w.clone(),
            ValueFact::new(dtype::FLOAT, shape.iter().map(|&v| Dim::Known(v)).collect()),
        ));
    }
    let mut seeds = vec![(h_out.clone(), dh_in.clone()), (y.clone(), gy_t.clone())];
    if lstm {
        seeds.push((c_out.clone(), dc_in.clone()));
    }
    let mut wrt = vec![xw_t.clone(), h_t.clone()];
    if lstm {
        wrt.push(c_t.clone());
    }
    wrt.extend(weights.iter().map(|w| w.0.clone()));
    let label = format!("{} node '{}' (one step)", c.node.op_type, c.node.name);
    let range = (0..bb.nodes.len(), 0..bb.initializers.len());
    let mut grads = c.engine(&label)?(c.model, c.idx, &mut bb, &label, &cell_inputs, range, &seeds, &wrt)?;
    let mut take = |bb: &mut Builder, t: &str, like: &str| -> String {
        grads.remove(t).unwrap_or_else(|| {
            let s = bb.op("Shape", &[like], vec![], "grad/scan");
            let z = dagr_onnx::tensor::f32_tensor("", &[1], &[0.0]);
            bb.op("ConstantOfShape", &[&s], vec![attr_tensor("value", z)], "grad/scan")
        })
    };
    let dh_out = take(&mut bb, &h_t, &h_t);
    let dc_out = lstm.then(|| take(&mut bb, &c_t, &c_t));
    let mut acc_out = Vec::new();
    for ((w, _), a) in weights.iter().zip(&acc_in) {
        let gw = take(&mut bb, w, w);
        acc_out.push(bb.op("Add", &[a, &gw], vec![], "grad/scan"));
    }
    let dxw = take(&mut bb, &xw_t, &xw_t);
    let mut g = GraphProto::new();
    g.name = bb.name("backward_step");
    g.input.push(value_info(&dh_in, dtype::FLOAT, state.clone()));
    if lstm {
        g.input.push(value_info(&dc_in, dtype::FLOAT, state.clone()));
    }
    for ((_, shape), a) in weights.iter().zip(&acc_in) {
        g.input.push(value_info(
            a,
            dtype::FLOAT,
            shape.iter().map(|&v| Dim::Known(v)).collect(),
        ));
    }
    g.input
        .push(value_info(&xw_t, dtype::FLOAT, vec![b_.clone(), gh.clone()]));
    g.input.push(value_info(&h_t, dtype::FLOAT, state.clone()));
    if lstm {
        g.input.push(value_info(&c_t, dtype::FLOAT, state.clone()));
    }
    g.input.push(value_info(&gy_t, dtype::FLOAT, state.clone()));
    if mask.is_some() {
        g.input
            .push(value_info(&m_t, dtype::BOOL, vec![b_.clone(), Dim::Known(1)]));
    }
    g.output.push(value_info(&dh_out, dtype::FLOAT, state.clone()));
    if let Some(dc) = &dc_out {
        g.output.push(value_info(dc, dtype::FLOAT, state.clone()));
    }
    for ((_, shape), a) in weights.iter().zip(&acc_out) {
        g.output.push(value_info(
            a,
            dtype::FLOAT,
            shape.iter().map(|&v| Dim::Known(v)).collect(),
        ));
    }
    g.output.push(value_info(&dxw, dtype::FLOAT, vec![b_.clone(), gh]));
    c.b.names = bb.names.clone();
    g.node = bb.nodes;
    g.initializer = bb.initializers;

    let mut states = vec![carries[0].clone()];
    if lstm {
        states.push(carries[1].clone());
    }
    for (w, _) in &weights {
        states.push(c.zeros_like(w));
    }
    let mut scans = vec![dir.xw.clone(), h_prev.to_string()];
    scans.extend(c_prev.map(String::from));
    scans.push(gy.to_string());
    scans.extend(mask.map(String::from));
    // Backward in time: the other way round from the cell.
    let (finals, seqs) = scan(c, g, &states, &scans, 1, !reverse);
    let mut seeds = vec![(dir.xw.clone(), seqs[0].clone()), (dir.h0.clone(), finals[0].clone())];
    let mut k = 1;
    if let Some(c0) = &dir.c0 {
        seeds.push((c0.clone(), finals[1].clone()));
        k = 2;
    }
    for (i, (w, _)) in weights.iter().enumerate() {
        seeds.push((w.clone(), finals[k + i].clone()));
    }
    Ok(seeds)
}

/// Finite-difference cases of this module's ops (see `crate::cases`).
pub fn cases() -> Vec<crate::cases::Case> {
    use crate::cases::*;
    use dagr_onnx::builder::{attr_float, attr_int, attr_string};
    use dagr_onnx::proto::AttributeProto;
    use Gen::Unit;
    vec![
        // Recurrent cells (inputs X, W, R, B, sequence_lens, initial_h[, initial_c, P]), the
        // loss over every output; the batch symbolic, and in some the sequence length too.
        case(
            "rnn_initial_state",
            "RNN",
            vec![
                x(&[4, 2, 3]),
                x(&[1, 5, 3]),
                x(&[1, 5, 5]),
                x(&[1, 10]),
                In::Absent,
                x(&[1, 2, 5]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 5)])
        .all_outputs(2)
        .symbolic(&[0, 1]),
        case(
            "gru_bidirectional_linear_before_reset",
            "GRU",
            vec![
                x(&[3, 2, 4]),
                x(&[2, 9, 4]),
                x(&[2, 9, 3]),
                x(&[2, 18]),
                In::Absent,
                x(&[2, 2, 3]),
            ],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_string("direction", "bidirectional"),
            attr_int("linear_before_reset", 1),
        ])
        .all_outputs(2)
        .symbolic(&[1]),
        // tract runs no sequence_lens that differ, ONNX Runtime no layout 1.
        case(
            "gru_reverse_sequence_lens",
            "GRU",
            vec![
                x(&[3, 2, 4]),
                x(&[1, 9, 4]),
                x(&[1, 9, 3]),
                x(&[1, 18]),
                In::I32(vec![2], vec![3, 2]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_string("direction", "reverse")])
        .all_outputs(2)
        .symbolic(&[0, 1])
        .only(ORT_ONLY),
        case(
            "gru_layout1",
            "GRU",
            vec![
                x(&[2, 3, 4]),
                x(&[1, 9, 4]),
                x(&[1, 9, 3]),
                x(&[1, 18]),
                In::Absent,
                x(&[2, 1, 3]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_int("layout", 1)])
        .all_outputs(2)
        .only(TRACT_ONLY),
        case(
            "lstm_bidirectional_peepholes",
            "LSTM",
            vec![
                x(&[3, 2, 4]),
                x(&[2, 12, 4]),
                x(&[2, 12, 3]),
                x(&[2, 24]),
                In::Absent,
                x(&[2, 2, 3]),
                x(&[2, 2, 3]),
                x(&[2, 9]),
            ],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_string("direction", "bidirectional"),
        ])
        .all_outputs(3)
        .symbolic(&[0, 1]),
        case(
            "lstm_sequence_lens_no_bias",
            "LSTM",
            vec![
                x(&[3, 2, 4]),
                x(&[1, 12, 4]),
                x(&[1, 12, 3]),
                In::Absent,
                In::I32(vec![2], vec![1, 3]),
            ],
        )
        .attrs(vec![attr_int("hidden_size", 3), attr_int("input_forget", 1)])
        .all_outputs(3)
        .symbolic(&[1])
        .only(ORT_ONLY),
        // Activations with parameters, and clipped gates (tract 0.23's GRU runs its default
        // activations whatever the node says: the forward differs from ONNX Runtime's). Small
        // values keep the central differences off the kinks of the clip and of LeakyRelu.
        case(
            "gru_activations_clip",
            "GRU",
            vec![x(&[3, 2, 4]), x(&[1, 9, 4]), x(&[1, 9, 3]), x(&[1, 18])],
        )
        .attrs(vec![
            attr_int("hidden_size", 3),
            attr_float("clip", 1.2),
            AttributeProto {
                name: "activations".into(),
                type_: dagr_onnx::proto::attribute_proto::AttributeType::STRINGS.into(),
                strings: vec![b"HardSigmoid".to_vec(), b"LeakyRelu".to_vec()],
                ..Default::default()
            },
            AttributeProto {
                name: "activation_alpha".into(),
                type_: dagr_onnx::proto::attribute_proto::AttributeType::FLOATS.into(),
                floats: vec![0.3, 0.1],
                ..Default::default()
            },
        ])
        .all_outputs(2)
        .gen(Unit)
        .symbolic(&[1])
        .only(ORT_ONLY),
    ]
}
