//! RNN, GRU and LSTM, differentiated through their bodies: each cell written as the ONNX spec
//! writes it (MatMul, Add, Mul and the cell's activations), unrolled over the sequence length,
//! which must be known when the graph is built. The forward keeps the fused op; the backward
//! recomputes the unrolled cells and the engine differentiates them.
//!
//! Covered: both directions and `bidirectional`, `layout` 0 and 1, initial states (absent means
//! zeros), `sequence_lens` (a step past a sequence's length keeps its state and outputs zeros),
//! `clip`, `linear_before_reset` (GRU), `input_forget` and peepholes (LSTM), and every activation
//! the spec lists with its `activation_alpha` / `activation_beta`.

use crate::ctx::Ctx;
use dagr_onnx::builder::{attr_float, attr_int, attr_ints};
use dagr_onnx::error::Result;
use dagr_onnx::{dtype, Dim};

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

pub fn rnn(c: &mut Ctx) -> Result<Vec<String>> {
    unroll(c, Cell::Rnn)
}
pub fn gru(c: &mut Ctx) -> Result<Vec<String>> {
    unroll(c, Cell::Gru)
}
pub fn lstm(c: &mut Ctx) -> Result<Vec<String>> {
    unroll(c, Cell::Lstm)
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
}

/// The node's inputs in layout 0 (`[seq, batch, ...]`, states `[dirs, batch, hidden]`).
struct Inputs {
    x: String,
    h0: String,
    c0: String,
}

fn unroll(c: &mut Ctx, cell: Cell) -> Result<Vec<String>> {
    let hidden = c.attr_i("hidden_size", 0);
    let w = c.input(1).to_string();
    let ws = c.known_shape(&w)?;
    let gates = cell.gates();
    let hidden = if hidden > 0 {
        hidden
    } else {
        ws.get(1).copied().unwrap_or(0) / gates
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
    let clip = dagr_onnx::attr::attr(c.node, "clip").map(|a| a.f);
    let acts = activations(c, cell, reverse.len())?;
    let x_in = c.input(0).to_string();
    let xs = c.shape(&x_in)?;
    let steps = match xs.get(layout as usize) {
        Some(Dim::Known(t)) => *t as usize,
        other => {
            return Err(c.err(format!(
                "its sequence length is {}; the gradient unrolls the recurrence and needs it known when \
                 the graph is built (export with a fixed sequence length)",
                other.map(|d| d.to_string()).unwrap_or_else(|| "unknown".into())
            )))
        }
    };
    if steps == 0 {
        return Err(c.err("its sequence is empty"));
    }

    // Layout 1 is [batch, seq, ...]: work in layout 0 and transpose the outputs back.
    let ins = if layout == 0 {
        Inputs {
            x: x_in,
            h0: c.input(5).to_string(),
            c0: c.input(6).to_string(),
        }
    } else {
        let tr = |c: &mut Ctx, t: &str| -> String {
            if t.is_empty() {
                String::new()
            } else {
                c.op_a("Transpose", &[t], vec![attr_ints("perm", &[1, 0, 2])])
            }
        };
        let (h, cc) = (c.input(5).to_string(), c.input(6).to_string());
        Inputs {
            x: tr(c, &x_in),
            h0: tr(c, &h),
            c0: tr(c, &cc),
        }
    };
    let lens = match c.input(4) {
        "" => None,
        l => {
            let l = l.to_string();
            Some(c.cast(&l, dtype::INT32))
        }
    };
    let (r, bias, peep) = (c.input(2).to_string(), c.input(3).to_string(), c.input(7).to_string());

    let mut ys = Vec::new();
    let mut hs = Vec::new();
    let mut cs = Vec::new();
    for (d, &rev) in reverse.iter().enumerate() {
        let p = Params::of(c, cell, hidden, d, &w, &r, &bias, &peep, &ins, steps)?;
        let order: Vec<usize> = if rev {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        let mut h = p.h0.clone();
        let mut cc = p.c0.clone();
        let mut y = vec![String::new(); steps];
        for t in order {
            let (hn, cn) = p.step(c, cell, &acts[d], clip, &p.x_steps[t], &h, &cc)?;
            if let Some(l) = &lens {
                // [1, batch, 1]: whether step t lies within each sequence.
                let ti = c.b.const_i64(&[t as i64]);
                let ti = c.cast(&ti, dtype::INT32);
                let within = c.op("Less", &[&ti, l]);
                let within = c.unsqueeze(&within, &[0, 2]);
                let zero = c.scalar(0.0);
                y[t] = c.op("Where", &[&within, &hn, &zero]);
                h = c.op("Where", &[&within, &hn, &h]);
                if cell == Cell::Lstm {
                    cc = c.op("Where", &[&within, &cn, &cc]);
                }
            } else {
                y[t] = hn.clone();
                h = hn;
                cc = cn;
            }
        }
        let refs: Vec<&str> = y.iter().map(String::as_str).collect();
        let yd = c.op_a("Concat", &refs, vec![attr_int("axis", 0)]);
        ys.push(c.unsqueeze(&yd, &[1]));
        hs.push(h);
        cs.push(cc);
    }
    let cat = |c: &mut Ctx, parts: &[String], axis: i64| -> String {
        match parts {
            [one] => one.clone(),
            _ => {
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                c.op_a("Concat", &refs, vec![attr_int("axis", axis)])
            }
        }
    };
    let mut y = cat(c, &ys, 1);
    let mut yh = cat(c, &hs, 0);
    if layout != 0 {
        y = c.op_a("Transpose", &[&y], vec![attr_ints("perm", &[2, 0, 1, 3])]);
        yh = c.op_a("Transpose", &[&yh], vec![attr_ints("perm", &[1, 0, 2])]);
    }
    let mut out = vec![y, yh];
    if cell == Cell::Lstm {
        let mut yc = cat(c, &cs, 0);
        if layout != 0 {
            yc = c.op_a("Transpose", &[&yc], vec![attr_ints("perm", &[1, 0, 2])]);
        }
        out.push(yc);
    }
    Ok(out)
}

/// One direction's weights, split as its cells use them.
struct Params {
    /// X W^T + biases, one `[1, batch, gates x hidden]` tensor per step.
    x_steps: Vec<String>,
    /// R^T, `[hidden, gates x hidden]` (GRU: the update and reset gates only).
    rt: String,
    /// GRU: Rh^T and (with `linear_before_reset`) Rbh.
    rh_t: Option<String>,
    rbh: Option<String>,
    linear_before_reset: bool,
    input_forget: bool,
    /// LSTM peepholes `[hidden]` each: input, output, forget.
    peep: Option<[String; 3]>,
    hidden: i64,
    h0: String,
    c0: String,
}

impl Params {
    #[allow(clippy::too_many_arguments)]
    fn of(
        c: &mut Ctx,
        cell: Cell,
        hidden: i64,
        d: usize,
        w: &str,
        r: &str,
        bias: &str,
        peep: &str,
        ins: &Inputs,
        steps: usize,
    ) -> Result<Params> {
        let gh = cell.gates() * hidden;
        let hint = c.hint();
        let lbr = cell == Cell::Gru && c.attr_i("linear_before_reset", 0) != 0;
        let wd = c.direction(w, d).unwrap_or_default();
        let wt = c.op_a("Transpose", &[&wd], vec![attr_ints("perm", &[1, 0])]);
        let mut xw = c.op("MatMul", &[&ins.x, &wt]);
        let rd = c.direction(r, d).unwrap_or_default();
        let (rzr, rh) = if cell == Cell::Gru {
            let p = c.b.split(&rd, 0, &[2 * hidden, hidden], &format!("grad/{hint}"));
            (p[0].clone(), Some(p[1].clone()))
        } else {
            (rd, None)
        };
        let rt = c.op_a("Transpose", &[&rzr], vec![attr_ints("perm", &[1, 0])]);
        let rh_t = rh.map(|m| c.op_a("Transpose", &[&m], vec![attr_ints("perm", &[1, 0])]));
        let mut rbh = None;
        if let Some(bd) = c.direction(bias, d) {
            let wb_rb = c.b.split(&bd, 0, &[gh, gh], &format!("grad/{hint}"));
            xw = c.op("Add", &[&xw, &wb_rb[0]]);
            let rb = if lbr {
                // Rbh is applied inside the reset gate's product; the others add straight.
                let parts = c.b.split(&wb_rb[1], 0, &[2 * hidden, hidden], &format!("grad/{hint}"));
                rbh = Some(parts[1].clone());
                let zeros = c.b.const_f32(&[hidden], &vec![0.0; hidden as usize]);
                c.op_a("Concat", &[&parts[0], &zeros], vec![attr_int("axis", 0)])
            } else {
                wb_rb[1].clone()
            };
            xw = c.op("Add", &[&xw, &rb]);
        }
        let x_steps = if steps == 1 {
            vec![xw]
        } else {
            c.b.split(&xw, 0, &vec![1; steps], &format!("grad/{hint}"))
        };
        let peep = match c.direction(peep, d) {
            Some(pd) => {
                let p = c.b.split(&pd, 0, &[hidden, hidden, hidden], &format!("grad/{hint}"));
                Some([p[0].clone(), p[1].clone(), p[2].clone()])
            }
            None => None,
        };
        let h0 = match c.direction(&ins.h0, d) {
            Some(h) => c.unsqueeze(&h, &[0]),
            None => zeros_state(c, &ins.x, hidden),
        };
        let c0 = if cell != Cell::Lstm {
            String::new()
        } else {
            match c.direction(&ins.c0, d) {
                Some(h) => c.unsqueeze(&h, &[0]),
                None => zeros_state(c, &ins.x, hidden),
            }
        };
        Ok(Params {
            x_steps,
            rt,
            rh_t,
            rbh,
            linear_before_reset: lbr,
            input_forget: c.attr_i("input_forget", 0) != 0,
            peep,
            hidden,
            h0,
            c0,
        })
    }

    /// One cell: the new hidden state (and LSTM cell state), `[1, batch, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        c: &mut Ctx,
        cell: Cell,
        acts: &[Act],
        clip: Option<f32>,
        xw: &str,
        h: &str,
        cs: &str,
    ) -> Result<(String, String)> {
        let hint = format!("grad/{}", c.hint());
        let hr = c.op("MatMul", &[h, &self.rt]);
        let hd = self.hidden;
        match cell {
            Cell::Rnn => {
                let pre = c.op("Add", &[xw, &hr]);
                Ok((c.activate(&acts[0], &pre, clip), String::new()))
            }
            Cell::Gru => {
                let xg = c.b.split(xw, 2, &[hd, hd, hd], &hint);
                let hg = c.b.split(&hr, 2, &[hd, hd], &hint);
                let zp = c.op("Add", &[&xg[0], &hg[0]]);
                let z = c.activate(&acts[0], &zp, clip);
                let rp = c.op("Add", &[&xg[1], &hg[1]]);
                let r = c.activate(&acts[0], &rp, clip);
                let rh_t = self.rh_t.as_deref().unwrap_or_default();
                let inner = if self.linear_before_reset {
                    let hh = c.op("MatMul", &[h, rh_t]);
                    let hh = match &self.rbh {
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
                Ok((c.op("Add", &[&n, &zd]), String::new()))
            }
            Cell::Lstm => {
                let pre = c.op("Add", &[xw, &hr]);
                let g = c.b.split(&pre, 2, &[hd, hd, hd, hd], &hint);
                let (pi, po, pf, pc) = (&g[0], &g[1], &g[2], &g[3]);
                let peep = |c: &mut Ctx, p: &str, k: usize, state: &str| -> String {
                    match &self.peep {
                        Some(ps) => {
                            let m = c.op("Mul", &[&ps[k], state]);
                            c.op("Add", &[p, &m])
                        }
                        None => p.to_string(),
                    }
                };
                let ip = peep(c, pi, 0, cs);
                let i = c.activate(&acts[0], &ip, clip);
                let f = if self.input_forget {
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
                Ok((c.op("Mul", &[&o, &hc]), cn))
            }
        }
    }
}

/// Zeros `[1, batch, hidden]`, the batch read from `x` (`[seq, batch, input]`).
fn zeros_state(c: &mut Ctx, x: &str, hidden: i64) -> String {
    let s = c.shape_of(x);
    let one = c.b.scalar_i64(1);
    let batch = c.op_a("Gather", &[&s, &one], vec![attr_int("axis", 0)]);
    let batch = c.unsqueeze(&batch, &[0]);
    let (head, tail) = (c.ints(&[1]), c.ints(&[hidden]));
    let shape = c.op_a("Concat", &[&head, &batch, &tail], vec![attr_int("axis", 0)]);
    let z = dagr_onnx::tensor::f32_tensor("", &[1], &[0.0]);
    c.op_a(
        "ConstantOfShape",
        &[&shape],
        vec![dagr_onnx::builder::attr_tensor("value", z)],
    )
}
