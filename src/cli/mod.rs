//! The command line: arguments parsed with clap, the library called, results printed.

pub mod signals;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use dagr_inject::dagr::training::{self as train, Pareto, TrainOptions};
use dagr_inject::dagr::{self, Config, Dispersion, Reduce, Task, Variant};
use dagr_inject::onnx::{self, Model};
use dagr_inject::runtime::{self, Backend};
use dagr_inject::{inspect, npz};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

const EXAMPLES: &str = "\
Examples:
  dagr-inject inspect models/av_cnn.legacy.onnx
  dagr-inject models/av_cnn.legacy.onnx --encoders audio,visual
  dagr-inject models/av_cnn.legacy.onnx --encoders audio,visual \\
      --logits logits,logits_audio,logits_visual --labels label -o av_cnn.dagr.onnx
  dagr-inject block --modalities 2 --dim 512 -o dagr_block.onnx
  dagr-inject run av_cnn.dagr.onnx --inputs models/av_cnn.inputs.npz --backend ort -o out.npz";

#[derive(Parser)]
#[command(
    name = "dagr-inject",
    version,
    about = "Add the DAGR geometry regularizer to ONNX multimodal models, in standard ONNX operators",
    long_about = "Rewrites an ONNX model so that it also computes DAGR (RBF dispersion inside each modality, \
bounded hinge anchoring across modalities, on L2-normalized encoder outputs) and its gradients with \
respect to the encoder outputs, using standard ONNX operators only. The rewritten model runs on \
stock ONNX Runtime and on tract.\n\n`dagr-inject MODEL --encoders a,b` is short for `dagr-inject inject MODEL --encoders a,b`.",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show opsets, inputs, outputs, parameters, and the tensors that look like encoder outputs
    Inspect {
        model: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Add the DAGR subgraph (losses and encoder-output gradients) to a model
    Inject(InjectArgs),
    /// Write a standalone DAGR model: inputs are embeddings, outputs are losses and gradients
    Block(BlockArgs),
    /// Train a training graph (built with --train) and export the trained inference model
    Train(TrainArgs),
    /// Check a rewritten model: reference outputs, the original's outputs, DAGR against the
    /// built-in reference, parameter gradients against finite differences, backend parity
    Verify {
        model: PathBuf,
        /// .npz with inputs (named like the graph inputs) and expected outputs (named like outputs)
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Inputs for the built-in checks (default: the reference file, else random inputs)
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// The model before the rewrite: its outputs must be unchanged
        #[arg(long)]
        original: Option<PathBuf>,
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [BackendArg::Tract, BackendArg::Ort])]
        backend: Vec<BackendArg>,
        /// Relative tolerance (max |got - want| / max |want|)
        #[arg(long, default_value_t = 1e-5)]
        rtol: f64,
        #[arg(long)]
        json: bool,
    },
    /// Geometry diagnostics of the embeddings (effective rank, drift, margin, similarity gap,
    /// Recall@K), robustness to missing or noisy modalities, pictures (SVG and PNG)
    Diagnose(DiagnoseArgs),
    /// Run a model on tract or ONNX Runtime with inputs from an .npz file
    Run(RunArgs),
}

#[derive(Args)]
struct DiagnoseArgs {
    /// A rewritten model, or any model with --encoders (rewritten in memory)
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Int64 class labels in the data (margin, PCA colours, accuracies)
    #[arg(long)]
    labels: Option<String>,
    /// Logits outputs whose accuracy to report under missing/noisy modalities
    #[arg(long, value_delimiter = ',')]
    heads: Vec<String>,
    /// Encoders, for a model not rewritten yet
    #[arg(long, value_delimiter = ',')]
    encoders: Vec<String>,
    #[arg(long, value_enum, default_value = "tract")]
    backend: BackendArg,
    /// Directory for report.json, report.txt and the pictures
    #[arg(long)]
    out: PathBuf,
    /// A `train` log.jsonl: also draw curves.svg (losses, geometry, accuracy per epoch)
    #[arg(long)]
    logs: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    model: PathBuf,
    /// .npz whose arrays are named like the graph inputs
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long, value_enum, default_value = "tract")]
    backend: BackendArg,
    /// Outputs to compute (default: all graph outputs)
    #[arg(long, value_delimiter = ',')]
    outputs: Vec<String>,
    /// Write the outputs to this .npz (default: print a summary)
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct DagrArgs {
    /// Reduction of encoder outputs of rank > 2 to [batch, D]
    #[arg(long, value_enum, default_value = "flatten")]
    reduce: ReduceArg,
    /// RBF temperature (> 0)
    #[arg(long, default_value_t = dagr::config::defaults::TAU)]
    tau: f64,
    /// Anchoring tolerance: pairs closer than this get no gradient (>= 0)
    #[arg(long, default_value_t = dagr::config::defaults::DELTA)]
    delta: f64,
    /// Weight of the dispersion term
    #[arg(long, default_value_t = dagr::config::defaults::LAMBDA_DISP)]
    lambda_disp: f64,
    /// Weight of the anchoring term
    #[arg(long, default_value_t = dagr::config::defaults::LAMBDA_ANC)]
    lambda_anc: f64,
    /// Dispersion potential
    #[arg(long, value_enum, default_value = "rbf")]
    dispersion: DispersionArg,
    /// Margin r of the hinge dispersion potential
    #[arg(long, default_value_t = dagr::config::defaults::MARGIN)]
    margin: f64,
    /// Ablation variant
    #[arg(long, value_enum, default_value = "dagr")]
    variant: VariantArg,
    /// Dispersion only (same as --variant disp-only); allows encoders of unequal widths
    #[arg(long)]
    no_anchor: bool,
}

#[derive(Args)]
struct InjectArgs {
    /// The ONNX model to rewrite (never modified)
    model: PathBuf,
    /// Encoder outputs: module scopes (audio), tensor names, or name=tensor, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    encoders: Vec<String>,
    /// Output path (default: MODEL with .dagr.onnx)
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    dagr: DagrArgs,
    /// An existing scalar loss output to add DAGR to
    #[arg(long, conflicts_with_all = ["logits", "labels"])]
    loss: Option<String>,
    /// Logits to append a cross-entropy over (summed), with --labels
    #[arg(long, value_delimiter = ',', requires = "labels")]
    logits: Vec<String>,
    /// Name of the int64 label input for --logits
    #[arg(long, requires = "logits")]
    labels: Option<String>,
    /// Print what was done as JSON
    #[arg(long)]
    json: bool,
    /// Also build the backward graph: `<param>_grad` for every trainable parameter
    #[arg(long)]
    train: bool,
    /// With --train: parameters not to train (glob patterns, e.g. 'head_*')
    #[arg(long, value_delimiter = ',', requires = "train")]
    freeze: Vec<String>,
    /// With --train: also train these tensors (glob patterns), which stay constant otherwise:
    /// scalar or folded initializers, Constant nodes that feed no MatMul/Gemm/Conv weight
    #[arg(long, value_delimiter = ',', requires = "train")]
    trainable: Vec<String>,
    /// With --train: tensors the gradient does not flow through (e.g. detached fusion inputs)
    #[arg(long, value_delimiter = ',', requires = "train")]
    stop_gradient: Vec<String>,
    /// With --train: Pareto-balance dispersion and anchoring (alpha* in the graph)
    #[arg(long, value_enum, requires = "train")]
    pareto: Option<ParetoArg>,
    /// With --pareto: scale of the balanced geometry gradient
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// With --train: a baseline that trains the task loss alone (DAGR's terms are still output)
    #[arg(long, requires = "train")]
    no_dagr: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The training graph (dagr-inject MODEL --encoders ... --train)
    model: PathBuf,
    /// Training data: .npz with arrays named like the graph inputs and the label input
    #[arg(long)]
    data: PathBuf,
    /// Validation data (same layout): accuracy of every head after each epoch
    #[arg(long)]
    val: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimArg,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// SGD momentum
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// SGD Nesterov momentum
    #[arg(long)]
    nesterov: bool,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// AdamW betas
    #[arg(long, value_delimiter = ',', default_values_t = [0.9, 0.999])]
    betas: Vec<f64>,
    /// AdamW epsilon
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    #[arg(long, value_enum, default_value = "constant")]
    schedule: ScheduleArg,
    /// Step schedule: epochs between decays
    #[arg(long, default_value_t = 10)]
    step_size: usize,
    /// Step schedule: decay factor
    #[arg(long, default_value_t = 0.1)]
    gamma: f64,
    /// Cosine schedule: final learning rate
    #[arg(long, default_value_t = 0.0)]
    min_lr: f64,
    /// Linear warm-up steps
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Clip gradients to this global L2 norm
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    #[arg(long, value_enum, default_value = "tract")]
    backend: BackendArg,
    /// cuda: ONNX Runtime's CUDA execution provider (needs --backend ort and onnxruntime-gpu);
    /// parameters and optimizer state then stay on the GPU
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// ONNX Runtime's intra-op threads (default: one per physical core)
    #[arg(long)]
    threads: Option<usize>,
    /// How the backend keeps the state between steps: two-sets (one read, one written: the
    /// fastest), in-place (one set, each write gated on the step's acceptance, on the CPU the
    /// largest tensors updated in parts of rows: half the state's memory), auto (two sets where
    /// they fit in memory)
    #[arg(long, value_enum, default_value = "auto")]
    state_update: StateUpdateArg,
    /// Micro-batches per step: each batch is split in K parts whose gradients are summed (each
    /// weighted by its share of the batch) before one update; DAGR's terms are per micro-batch.
    /// Memory of one micro-batch, plus one copy of the parameters for the sums
    #[arg(long, default_value_t = 1, value_name = "K")]
    grad_accum: usize,
    /// Data-parallel training over MPI, under `mpirun -np N`: each process takes its share of
    /// every batch (--batch-size is the global batch), the gradients are summed across processes
    /// before each update, process 0 writes the run's files
    #[arg(long)]
    distributed: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the data order (no shuffling)
    #[arg(long)]
    no_shuffle: bool,
    /// Drop the last partial batch of each epoch
    #[arg(long)]
    drop_last: bool,
    /// Output directory: checkpoint, log.jsonl, model.onnx (the trained inference model),
    /// step.onnx (one training step as a standard ONNX graph; with --grad-accum, the update, and
    /// step.grad.onnx the gradient of a micro-batch)
    #[arg(long)]
    out: PathBuf,
    /// The model the training graph was built from (default: recorded in the graph)
    #[arg(long)]
    original: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    resume: bool,
    /// Reuse an existing --out directory, starting over (its checkpoint, log and models are
    /// removed first)
    #[arg(long)]
    force: bool,
    /// With --resume: continue with settings other than the checkpoint's (learning rate,
    /// optimizer, ...), saying what changes; a changed optimizer starts from a zero state
    #[arg(long, requires = "resume")]
    new_settings: bool,
    /// Stop after this many steps
    #[arg(long)]
    max_steps: Option<usize>,
}

/// Which runtime executes a model.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum BackendArg {
    /// tract: pure Rust, embedded, no install needed
    Tract,
    /// ONNX Runtime (CPU execution provider, or CUDA with --device cuda), loaded from its
    /// shared library
    Ort,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Tract => Backend::Tract,
            BackendArg::Ort => Backend::Ort,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimArg {
    Sgd,
    Adamw,
}
#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Constant,
    Step,
    Cosine,
}
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum DeviceArg {
    Cpu,
    Cuda,
}
#[derive(Clone, Copy, ValueEnum)]
enum StateUpdateArg {
    Auto,
    TwoSets,
    InPlace,
}

#[derive(Clone, Copy, ValueEnum)]
enum ParetoArg {
    Param,
    Feature,
}

#[derive(Args)]
struct BlockArgs {
    /// Number of modalities (>= 2)
    #[arg(long, default_value_t = 2)]
    modalities: usize,
    /// Embedding width
    #[arg(long)]
    dim: i64,
    /// Modality names (default m0, m1, ...)
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// Opset of the block (13 or newer)
    #[arg(long, default_value_t = 17)]
    opset: i64,
    #[arg(short, long, default_value = "dagr_block.onnx")]
    output: PathBuf,
    #[command(flatten)]
    dagr: DagrArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReduceArg {
    Flatten,
    Mean,
}
#[derive(Clone, Copy, ValueEnum)]
enum DispersionArg {
    Rbf,
    Hinge,
}
#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    Dagr,
    DispOnly,
    AnchorOnly,
    NaiveAlign,
    UnitSphere,
}

impl DagrArgs {
    fn config(&self, encoders: Vec<String>, task: Task) -> Config {
        Config {
            encoders,
            reduce: match self.reduce {
                ReduceArg::Flatten => Reduce::Flatten,
                ReduceArg::Mean => Reduce::Mean,
            },
            tau: self.tau,
            delta: self.delta,
            lambda_disp: self.lambda_disp,
            lambda_anc: self.lambda_anc,
            dispersion: match self.dispersion {
                DispersionArg::Rbf => Dispersion::Rbf,
                DispersionArg::Hinge => Dispersion::Hinge { margin: self.margin },
            },
            variant: if self.no_anchor {
                Variant::DispOnly
            } else {
                match self.variant {
                    VariantArg::Dagr => Variant::Dagr,
                    VariantArg::DispOnly => Variant::DispOnly,
                    VariantArg::AnchorOnly => Variant::AnchorOnly,
                    VariantArg::NaiveAlign => Variant::NaiveAlign,
                    VariantArg::UnitSphere => Variant::UnitSphere,
                }
            },
            task,
        }
    }
}

const SUBCOMMANDS: &[&str] = &[
    "inspect", "inject", "block", "train", "verify", "diagnose", "run", "help",
];

/// `dagr-inject MODEL --encoders ...` is the inject shorthand: insert the subcommand.
pub fn normalize_args(mut args: Vec<OsString>) -> Vec<OsString> {
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        if !first.starts_with('-') && !SUBCOMMANDS.contains(&first) {
            args.insert(1, "inject".into());
        }
    }
    args
}

/// Library messages name settings by their field names in backticks (`lambda_disp`), as the
/// Python binding spells them; on the command line each is a flag (--lambda-disp). The flags
/// are read from the argument definitions, so a setting without a flag is left as it is.
pub fn flags_for_fields(message: &str) -> String {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut longs: Vec<String> = Vec::new();
    for c in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
        longs.extend(c.get_arguments().filter_map(|a| a.get_long()).map(str::to_string));
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('`') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        let flag = name.replace('_', "-");
        let is_field = !name.is_empty() && name.bytes().all(|c| c.is_ascii_lowercase() || c == b'_');
        if is_field && longs.contains(&flag) {
            out.push_str("--");
            out.push_str(&flag);
        } else {
            out.push('`');
            out.push_str(name);
            out.push('`');
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

pub fn run(args: Vec<OsString>) -> Result<()> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                print!("{e}");
                return Ok(());
            }
            e.exit()
        }
    };
    match cli.command {
        Command::Inspect { model, json } => {
            let m = onnx::load(&model)?;
            let r = inspect::report(&m)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.to_text());
            }
        }
        Command::Inject(a) => inject_cmd(a)?,
        Command::Block(a) => block_cmd(a)?,
        Command::Train(a) => train_cmd(a)?,
        Command::Diagnose(a) => diagnose_cmd(a)?,
        Command::Verify {
            model,
            reference,
            inputs,
            original,
            backend,
            rtol,
            json,
        } => verify_cmd(
            &model,
            reference.as_deref(),
            inputs.as_deref(),
            original.as_deref(),
            &backend.iter().map(|&b| b.into()).collect::<Vec<Backend>>(),
            rtol,
            json,
        )?,
        Command::Run(a) => run_cmd(a)?,
    }
    Ok(())
}

fn diagnose_cmd(a: DiagnoseArgs) -> Result<()> {
    let scratch;
    let path = if a.encoders.is_empty() {
        a.model.clone()
    } else {
        let mut m = onnx::load(&a.model)?;
        let cfg = Config {
            encoders: a.encoders.clone(),
            ..Default::default()
        };
        dagr::inject(&mut m, &cfg)?;
        scratch = onnx::io::Scratch::new(&m)?;
        scratch.path().to_path_buf()
    };
    if let Some(l) = &a.logs {
        for n in ["curves.svg", "curves.png"] {
            onnx::io::refuse_overwrite(&a.out.join(n), &[l])?;
        }
    }
    let r =
        dagr_inject::diagnose::write_report(&path, &a.data, a.labels.as_deref(), &a.heads, a.backend.into(), &a.out)?;
    if let Some(l) = &a.logs {
        let text = std::fs::read_to_string(l).with_context(|| format!("reading {}", l.display()))?;
        dagr_inject::plots::write_picture(&a.out, "curves", &dagr_inject::plots::curves(&text)?)?;
    }
    print!("{}", r.to_text());
    println!(
        "\nwrote {}/report.json, report.txt and the pictures (.svg and .png)",
        a.out.display()
    );
    Ok(())
}

fn run_cmd(a: RunArgs) -> Result<()> {
    if let Some(p) = &a.output {
        onnx::io::refuse_overwrite(p, &[&a.model, &a.inputs])?;
    }
    let m = onnx::load(&a.model)?;
    let feed = npz::read(&a.inputs)?;
    check_feed(&m, &feed, &a.inputs, "")?;
    dagr::check_batch(&m, batch_of(&feed))?;
    let outs: Vec<String> = if a.outputs.is_empty() {
        m.graph().output.iter().map(|o| o.name.clone()).collect()
    } else {
        a.outputs.clone()
    };
    if outs.is_empty() {
        bail!("{} has no outputs: there is nothing to run", a.model.display());
    }
    let res = runtime::run(a.backend.into(), &a.model, &feed, &outs)?;
    match &a.output {
        Some(p) => {
            npz::write(p, &res)?;
            println!("wrote {} outputs to {}", res.len(), p.display());
        }
        None => {
            for (k, v) in &res {
                let preview = match v.as_f32() {
                    Some(a) => format!("{:?}", a.iter().take(4).collect::<Vec<_>>()),
                    None => String::new(),
                };
                println!("{k:<32} {} {:?} {preview}", v.dtype_name(), v.shape());
            }
        }
    }
    Ok(())
}

/// Every input the model reads is in `feed` (read from `from`): said here, naming them, not as a
/// runtime's "Missing Input". `also` ends the hint.
fn check_feed(m: &onnx::Model, feed: &runtime::Tensors, from: &Path, also: &str) -> Result<()> {
    let idx = dagr_inject::ops::index(m)?;
    let missing: Vec<String> = idx
        .user_inputs()
        .into_iter()
        .filter(|n| !feed.contains_key(n))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let one = missing.len() == 1;
    bail!(
        "{} lacks {} the model reads: {}\n  hint: add {} to the .npz (labels too, for a training graph){also}",
        from.display(),
        if one { "an input" } else { "inputs" },
        missing.join(", "),
        if one { "it" } else { "them" }
    )
}

/// The largest leading dimension of the inputs: the batch.
fn batch_of(feed: &runtime::Tensors) -> usize {
    feed.values()
        .filter_map(|v| v.shape().first().copied())
        .max()
        .unwrap_or(0)
}

fn default_output(model: &Path) -> PathBuf {
    let name = model.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx");
    let stem = name.strip_suffix(".onnx").unwrap_or(name);
    model.with_file_name(format!("{stem}.dagr.onnx"))
}

fn inject_cmd(a: InjectArgs) -> Result<()> {
    let task = match (&a.loss, &a.labels) {
        (Some(l), _) => Task::Loss { output: l.clone() },
        (None, Some(lab)) => Task::CrossEntropy {
            logits: a.logits.clone(),
            labels: lab.clone(),
        },
        (None, None) => Task::None,
    };
    let cfg = a.dagr.config(a.encoders.clone(), task);
    cfg.validate()?;
    let out = a.output.clone().unwrap_or_else(|| default_output(&a.model));
    onnx::io::refuse_overwrite(&out, &[&a.model])?;
    let mut model = onnx::load(&a.model)?;
    if a.train {
        let opts = TrainOptions {
            freeze: a.freeze.clone(),
            trainable: a.trainable.clone(),
            stop_gradient: a.stop_gradient.clone(),
            pareto: a.pareto.map(|p| match p {
                ParetoArg::Param => Pareto::Param,
                ParetoArg::Feature => Pareto::Feature,
            }),
            beta: a.beta,
            no_dagr: a.no_dagr,
        };
        let rec = train::make_training_graph(&mut model, &cfg, &opts)?;
        onnx::save(&model, &out).with_context(|| format!("writing {}", out.display()))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rec)?);
            return Ok(());
        }
        println!(
            "training graph: loss {}, {} trainable parameters",
            rec.loss,
            rec.params.len()
        );
        for (p, g) in &rec.params {
            let geo = if rec.encoder_params.contains(p) {
                "  (+ geometry)"
            } else {
                ""
            };
            println!("  {g}{geo}");
        }
        for s in &rec.batchnorm {
            println!(
                "  running statistics: {} -> {}, {} -> {}",
                s.mean.0, s.mean.1, s.var.0, s.var.1
            );
        }
        if let Some(a) = &rec.pareto_alpha {
            println!("  {a}");
        }
        for w in &rec.warnings {
            eprintln!("warning: {}", flags_for_fields(w));
        }
        println!("wrote {}", out.display());
        return Ok(());
    }
    let done = dagr::inject(&mut model, &cfg)?;
    onnx::save(&model, &out).with_context(|| format!("writing {}", out.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": out,
                "encoders": done.encoders,
                "outputs": done.record.outputs,
            }))?
        );
        return Ok(());
    }
    println!("encoders");
    for e in &done.encoders {
        let how = e.resolution.describe();
        println!(
            "  {:<10} {:<36} {:<8} {:<14} {how}",
            e.modality, e.tensor, e.dtype, e.shape
        );
    }
    let o = &done.record.outputs;
    println!("new outputs");
    let mut names = vec![o.loss.clone(), o.dispersion.clone()];
    names.extend(o.dispersion_per_modality.iter().map(|x| x.1.clone()));
    names.extend(o.anchoring.clone());
    names.extend(o.task_loss.clone());
    names.extend(o.total_loss.clone());
    names.extend(o.grads.iter().map(|x| x.1.clone()));
    names.extend(o.embeddings.iter().map(|x| x.1.clone()));
    println!("  {}", names.join("\n  "));
    if let Some(l) = &o.labels_input {
        println!("new input\n  {l} (int64 [batch] class labels)");
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn block_cmd(a: BlockArgs) -> Result<()> {
    if !(2..=dagr_inject::limits::MAX_MODALITIES).contains(&a.modalities) {
        bail!(
            "--modalities must be between 2 and {}, got {}",
            dagr_inject::limits::MAX_MODALITIES,
            a.modalities
        );
    }
    if a.dim < 1 {
        bail!("--dim must be positive, got {}", a.dim);
    }
    let names: Vec<String> = if a.names.is_empty() {
        (0..a.modalities).map(|i| format!("m{i}")).collect()
    } else {
        a.names.clone()
    };
    if names.len() != a.modalities {
        bail!(
            "--names lists {} names but --modalities is {}",
            names.len(),
            a.modalities
        );
    }
    let cfg = a.dagr.config(Vec::new(), Task::None);
    let (model, done) = dagr_inject::dagr::block::build(&names, a.dim, a.opset, &cfg)?;
    onnx::save(&model, &a.output)?;
    println!(
        "wrote {}: inputs {} [batch, {}]; outputs {}, {}",
        a.output.display(),
        names.join(", "),
        a.dim,
        done.record.outputs.loss,
        done.record
            .outputs
            .grads
            .iter()
            .map(|g| g.1.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _: &Model = &model;
    Ok(())
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    use dagr_inject::dagr::optim;
    use dagr_inject::train as tr;
    if a.betas.len() != 2 {
        bail!("--betas takes two numbers, e.g. --betas 0.9,0.999");
    }
    let settings = tr::Settings {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        optimizer: match a.optimizer {
            OptimArg::Sgd => optim::Optimizer::Sgd {
                momentum: a.momentum,
                nesterov: a.nesterov,
                weight_decay: a.weight_decay,
            },
            OptimArg::Adamw => optim::Optimizer::AdamW {
                beta1: a.betas[0],
                beta2: a.betas[1],
                eps: a.eps,
                weight_decay: a.weight_decay,
            },
        },
        schedule: match a.schedule {
            ScheduleArg::Constant => optim::Schedule::Constant,
            ScheduleArg::Step => optim::Schedule::Step {
                step_size: a.step_size,
                gamma: a.gamma,
            },
            ScheduleArg::Cosine => optim::Schedule::Cosine { min_lr: a.min_lr },
        },
        warmup_steps: a.warmup_steps,
        clip_grad_norm: a.clip_grad_norm,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        drop_last: a.drop_last,
        backend: a.backend.into(),
        device: match a.device {
            DeviceArg::Cpu => runtime::Device::Cpu,
            DeviceArg::Cuda => runtime::Device::Cuda,
        },
        threads: a.threads,
        state_update: match a.state_update {
            StateUpdateArg::Auto => tr::StateUpdate::Auto,
            StateUpdateArg::TwoSets => tr::StateUpdate::TwoSets,
            StateUpdateArg::InPlace => tr::StateUpdate::InPlace,
        },
        grad_accum: a.grad_accum,
        device_index: 0,
        state_part_bytes: None,
    };
    if a.distributed && !dagr_inject::dist::launched_by_mpi() {
        bail!(
            "--distributed runs under an MPI launcher, one process per share of each batch\n  hint: mpirun -np 2 dagr-inject train ... --distributed (without --distributed, one process trains alone)"
        );
    }
    #[cfg(not(feature = "mpi"))]
    if a.distributed {
        bail!("this dagr-inject was built without MPI (the `mpi` feature): --distributed is not available\n  hint: build with the default features");
    }
    #[cfg(feature = "mpi")]
    let mpi = match a.distributed {
        true => Some(dagr_inject::dist::mpi::Mpi::init()?),
        false => None,
    };
    #[cfg(feature = "mpi")]
    let comm: &dyn dagr_inject::dist::Collective = match &mpi {
        Some(m) => m,
        None => &dagr_inject::dist::Alone,
    };
    #[cfg(not(feature = "mpi"))]
    let comm: &dyn dagr_inject::dist::Collective = &dagr_inject::dist::Alone;
    let mut settings = settings;
    if comm.size() > 1 && settings.device == runtime::Device::Cuda {
        settings.device_index = dagr_inject::dist::local_rank();
    }
    let interrupted = crate::cli::signals::install();
    let run = tr::Run {
        model: &a.model,
        train: &a.data,
        val: a.val.as_deref(),
        out: &a.out,
        original: a.original.as_deref(),
        resume: a.resume,
        force: a.force,
        new_settings: a.new_settings,
        max_steps: a.max_steps,
        comm,
    };
    let mut report = TrainReport {
        stop: interrupted.clone(),
        bar: None,
    };
    let fitted = if comm.rank() == 0 {
        tr::fit(&run, settings, &mut report)
    } else {
        // The other processes say nothing (process 0 reports for the run).
        tr::fit(&run, settings, &mut interrupted.clone())
    };
    let fitted = match fitted {
        Ok(f) => f,
        // A process that fails alone ends them all (the others would wait for it forever).
        #[cfg(feature = "mpi")]
        Err(e) if comm.size() > 1 => {
            eprintln!("error (process {} of {}): {e}", comm.rank(), comm.size());
            match &mpi {
                Some(m) => m.abort(1),
                None => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if comm.rank() != 0 {
        return Ok(());
    }
    if let Some(l) = fitted.logs.last() {
        println!(
            "trained {} epochs ({} steps); final loss {:.5}",
            l.epoch, l.step, l.mean.loss
        );
        for (h, acc) in &l.val_accuracy {
            println!("  validation accuracy {h}: {acc:.4}");
        }
    }
    if fitted.files.is_empty() {
        for n in &fitted.notices {
            println!("{}", flags_for_fields(n));
        }
    } else {
        let names: Vec<String> = fitted.files.iter().map(|f| f.display().to_string()).collect();
        println!("wrote {}", names.join(", "));
    }
    Ok(())
}

/// What `train` shows: a progress bar per epoch on a terminal, notices and each epoch's JSON
/// log line on stderr; it stops on Ctrl-C or SIGTERM.
struct TrainReport {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    bar: Option<indicatif::ProgressBar>,
}

impl dagr_inject::train::Callbacks for TrainReport {
    fn notice(&mut self, text: &str) {
        eprintln!("{}", flags_for_fields(text));
    }
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        self.bar = Some(bar);
    }
    fn step(&mut self, stats: &dagr_inject::train::StepStats, samples_per_second: f64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.4} ({samples_per_second:.0} samples/s)", stats.loss));
            b.inc(1);
        }
    }
    fn epoch_end(&mut self, _log: &dagr_inject::train::EpochLog, line: &str) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        eprintln!("{line}");
    }
    fn should_stop(&self) -> bool {
        let stop = self.stop.load(std::sync::atomic::Ordering::SeqCst);
        if stop {
            if let Some(b) = &self.bar {
                b.abandon();
            }
        }
        stop
    }
}

fn verify_cmd(
    model: &Path,
    reference: Option<&Path>,
    inputs: Option<&Path>,
    original: Option<&Path>,
    backends: &[Backend],
    rtol: f64,
    json: bool,
) -> Result<()> {
    use dagr_inject::verify::{self, Check};
    if !(rtol.is_finite() && rtol >= 0.0) {
        bail!("--rtol must be a finite number >= 0, got {rtol}");
    }
    let m = onnx::load(model)?;
    let source = inputs.or(reference);
    let reference = reference.map(npz::read).transpose()?;
    let feed = match (inputs, &reference) {
        (Some(p), _) => npz::read(p)?,
        (None, Some(r)) => r.clone(),
        (None, None) => verify::random_inputs(&m, 4, 0)?,
    };
    if let Some(from) = source {
        check_feed(
            &m,
            &feed,
            from,
            ", or leave --inputs and --reference out to check on random inputs",
        )?;
    }
    dagr::check_batch(&m, batch_of(&feed))?;
    let mut checks: Vec<Check> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut record = |name: &str, r: dagr_inject::Result<Vec<Check>>| match r {
        Ok(c) => checks.extend(c),
        Err(e) => errors.push(format!("{name}: {e}")),
    };
    if let Some(r) = &reference {
        record("reference", verify::against_reference(model, r, backends, rtol));
    }
    if let Some(o) = original {
        record(
            "original unchanged",
            verify::against_original(model, o, &feed, backends, rtol),
        );
    }
    if dagr::record_of(&m).is_some() {
        record(
            "built-in reference",
            verify::against_builtin(model, &feed, backends, rtol),
        );
    }
    // Finite differences check the gradients, not the backend (the cross-backend check does):
    // they run on ONNX Runtime where it is among the backends, the faster at whole graphs.
    let fd_backend = backends
        .iter()
        .find(|b| **b == Backend::Ort)
        .or(backends.first())
        .copied();
    if let Some(b) = fd_backend {
        if dagr::record_of(&m).is_some() {
            record(
                "finite differences",
                verify::dagr_finite_differences(model, &feed, b, 6),
            );
        }
        record(
            "finite differences",
            verify::param_finite_differences(model, &feed, b, verify::PARAM_FD_DIRECTIONS),
        );
    }
    if backends.contains(&Backend::Tract) && backends.contains(&Backend::Ort) {
        record("tract = ort", verify::cross_backend(model, &feed, rtol.max(1e-5)));
    }
    let ok = errors.is_empty() && checks.iter().all(|c| c.pass);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"pass": ok, "checks": checks, "errors": errors}))?
        );
    } else {
        println!(
            "{:<20} {:<36} {:<6} {:>11} {:>11}  result",
            "check", "output", "backend", "max abs", "rel"
        );
        for c in &checks {
            println!(
                "{:<20} {:<36} {:<6} {:>11.3e} {:>11.3e}  {}",
                c.check,
                c.output,
                c.backend,
                c.max_abs,
                c.rel,
                if c.pass { "pass" } else { "FAIL" }
            );
        }
        for e in &errors {
            println!("error  {e}");
        }
        println!("{}", if ok { "all checks passed" } else { "verification FAILED" });
    }
    if !ok {
        bail!(
            "verification failed ({} failing checks, {} errors)",
            checks.iter().filter(|c| !c.pass).count(),
            errors.len()
        );
    }
    Ok(())
}

/// The whole command: arguments in, exit status out. Library errors are typed; here they become
/// `anyhow` errors, printed as one message (settings named as flags) with a non-zero exit (128 +
/// the signal's number for a run stopped by Ctrl-C or SIGTERM, as a shell reports it).
pub fn main_with(args: Vec<OsString>) -> i32 {
    // A panic inside tract that the runtime turns into an error is reported by that error, not
    // also by the default hook's "thread 'main' panicked at ..." lines.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !crate::runtime::tract_backend::in_guarded_call() {
            default_hook(info)
        }
    }));
    let args = normalize_args(args);
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", flags_for_fields(&format!("{e:#}")));
            match e.downcast_ref::<crate::Error>() {
                Some(crate::Error::Interrupted(_)) => 128 + signals::received().unwrap_or(2),
                _ => 1,
            }
        }
    }
}
