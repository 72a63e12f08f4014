//! Command-line definitions and one module per subcommand. Errors become `anyhow` here, at the
//! binary's edge; the library returns typed errors.

mod doctor;
mod eval;
mod forward;
mod heal;
mod prune;
mod score;
mod serve;

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use prunesweep_worker::model::decoder::format_ranges;
use prunesweep_worker::model::{default_dtype, parse_device, parse_dtype, LayerBlock, Model};
use prunesweep_worker::score::ScoreSpec;

/// prunesweep worker: score, prune, heal and evaluate LLM layers.
#[derive(Parser)]
#[command(name = "worker", version = prunesweep_worker::device::version_line())]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt and write its token ids, logits and residual states (safetensors).
    Forward(forward::ForwardArgs),
    /// Angular distance d(l, n) between the residual stream entering layer l and layer l+n, for
    /// every block (Gromov et al. 2024, §3.2), plus ShortGPT Block Influence, from one pass.
    Score(score::ScoreArgs),
    /// Drop layers (chosen by method, or given) and write the pruned model as an HF directory.
    Prune(prune::PruneArgs),
    /// Evaluate: MMLU (letter k-shot or cloze), BoolQ 0-shot, or C4 loss; writes a result JSON.
    Eval(eval::EvalArgs),
    /// Heal a cut with QLoRA on C4 (NF4 base, LoRA adapters, AdamW, cosine schedule); writes a
    /// PEFT adapter folder, resumable checkpoints and train_log.csv.
    Heal(heal::HealArgs),
    /// Serve a coordinator: register, lease jobs (score / baseline / prune → heal → eval), run
    /// them here, report the results; reconnects with backoff.
    Serve(serve::ServeArgs),
    /// What this build and machine have: CUDA or not, each GPU with its free memory, host memory;
    /// with --device, whether that device works (non-zero exit if not).
    Doctor(doctor::DoctorArgs),
}

impl Cli {
    /// The glibc malloc tunables the chosen subcommand runs with, if any
    /// ([`prunesweep_worker::allocator`]).
    pub fn malloc_tunables(&self) -> Option<&'static str> {
        match self.command {
            Command::Heal(_) => Some(prunesweep_worker::allocator::HEAL_MALLOC_TUNABLES),
            Command::Serve(_) => Some(prunesweep_worker::allocator::SERVE_MALLOC_TUNABLES),
            _ => None,
        }
    }

    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(a) => forward::run(a),
            Command::Score(a) => score::run(a),
            Command::Prune(a) => prune::run(a),
            Command::Eval(a) => eval::run(a),
            Command::Heal(a) => heal::run(a),
            Command::Serve(a) => serve::run(a),
            Command::Doctor(a) => doctor::run(a),
        }
    }
}

/// `--model`, `--drop`, `--device`: shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a .gguf file, an HF directory, an HF hub cache folder (models--org--name), or an HF
    /// id (org/name[@revision]): used from the local hub cache, or downloaded into it (HF_ENDPOINT,
    /// HF_TOKEN, HF_HUB_OFFLINE as for the Python client).
    #[arg(long, env = "PRUNESWEEP_MODEL")]
    pub model: PathBuf,
    /// Drop layers START..START+N-1 first (0-based, half-open like mergekit's layer_range), e.g. 20:6.
    #[arg(long, value_name = "START:N")]
    pub drop: Option<LayerBlock>,
    /// cpu, cuda or cuda:N (cuda needs a build with --features cuda). worker eval and worker
    /// forward also take several, e.g. cuda:0,cuda:1: the model's blocks are then read onto them
    /// in contiguous ranges, sized by each device's free memory (a model larger than one GPU).
    #[arg(long, default_value = "cpu", env = "PRUNESWEEP_DEVICE")]
    pub device: String,
    /// f32 or bf16; default: the device's own (f32 on cpu, bf16 on cuda). bf16 on a CPU runs the
    /// GPU code path (stock candle ops instead of the CPU's fused f32 kernels).
    #[arg(long, value_parser = parse_dtype, env = "PRUNESWEEP_DTYPE")]
    pub dtype: Option<DType>,
    /// A LoRA adapter folder (from `worker heal`, or PEFT) applied on top of the model, unmerged.
    /// The model must have the depth it was trained on (the same --drop).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The device, and the dtype (`--dtype`, else the device's own); fails when `--device` lists
    /// several.
    pub fn device_and_dtype(&self) -> anyhow::Result<(candle_core::Device, DType)> {
        let devices = self.devices()?;
        if devices.len() > 1 {
            return Err(self.one_device_only());
        }
        Ok((devices[0].clone(), self.dtype_on(&devices[0])))
    }

    /// The error for a `--device` list given to a command that runs on one device.
    fn one_device_only(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "--device {}: this command runs on one device (only worker eval and worker forward spread a model \
             over several); give one",
            self.device
        )
    }

    /// `--dtype`, else `device`'s own.
    fn dtype_on(&self, device: &candle_core::Device) -> DType {
        self.dtype.unwrap_or_else(|| default_dtype(device))
    }

    /// Every device `--device` lists (comma-separated), in order.
    pub fn devices(&self) -> anyhow::Result<Vec<candle_core::Device>> {
        self.device.split(',').map(|name| parse_device(name.trim()).map_err(anyhow::Error::msg)).collect()
    }

    /// Loads the model, applies `--drop`, then attaches `--adapter`.
    pub fn load(&self) -> anyhow::Result<Model> {
        self.load_base(Base::Dense)
    }

    /// [`ModelArgs::load`] with the blocks loaded as `base` says.
    pub fn load_base(&self, base: Base) -> anyhow::Result<Model> {
        let devices = self.devices()?;
        let (device, spread) = (&devices[0], devices.len() > 1);
        match base {
            Base::Holding(_) if spread => anyhow::bail!(
                "--hold-gib reads the blocks that do not fit from the checkpoint on one device; with several devices \
                 (--device {}) the blocks are spread over them instead: leave --hold-gib out, or give one device",
                self.device
            ),
            Base::Dense | Base::Nf4 if spread => return Err(self.one_device_only()),
            _ if spread && self.adapter.is_some() => {
                anyhow::bail!("--adapter needs the model on one device: give one --device, or merge the adapter first")
            }
            _ => {}
        }
        let dtype = self.dtype_on(device);
        let mut model = match base {
            Base::Nf4 => Model::load_nf4(&self.model, device, dtype)?,
            Base::Holding(_) => Model::load_offloaded(&self.model, device, dtype)?,
            Base::Spread if spread => Model::load_offloaded(&self.model, device, dtype)?,
            Base::Dense | Base::Spread => Model::load_as(&self.model, device, dtype)?,
        };
        if let Some(block) = self.drop {
            model.decoder.remove_layers(&block.indices())?;
        }
        if spread {
            let room = prunesweep_worker::device::room_for_blocks(&devices);
            let ranges = model.decoder.spread(&devices, &room)?;
            let kept = model.decoder.kept_layers();
            let placed: Vec<String> = self
                .device
                .split(',')
                .zip(&ranges)
                .map(|(name, range)| format!("{}: layers {}", name.trim(), format_ranges(&kept[range.clone()])))
                .collect();
            tracing::info!(devices = devices.len(), placed = placed.join("; "), "blocks spread over the devices");
        }
        if let Base::Holding(bytes) = base {
            let (held, bytes) = model.decoder.make_resident(bytes)?;
            tracing::info!(
                held,
                held_gib = format!("{:.2}", bytes as f64 / f64::from(1u32 << 30)),
                read_per_pass = model.decoder.offloaded_blocks(),
                "blocks that do not fit are read from the checkpoint for each pass"
            );
        }
        if let Some(dir) = &self.adapter {
            let spec = prunesweep_worker::heal::adapter::attach(&mut model, dir)?;
            tracing::info!(adapter = %dir.display(), rank = spec.rank, targets = ?spec.targets, "adapter attached");
        }
        tracing::info!(model = %model.describe(), "loaded");
        Ok(model)
    }
}

/// How `--model`'s blocks are loaded.
#[derive(Debug, Clone, Copy)]
pub enum Base {
    /// In the model's dtype.
    Dense,
    /// Their projections quantized to NF4 one tensor at a time while loading (a QLoRA base: the
    /// dense model is never held whole).
    Nf4,
    /// Left in the checkpoint, the first kept ones that fit in this many bytes then held, the rest
    /// read for each pass ([`Model::load_offloaded`]; after `--drop`).
    Holding(u64),
    /// As [`Base::Dense`] on one device; when `--device` lists several, left in the checkpoint and
    /// then read onto them in contiguous ranges (after `--drop`; [`prunesweep_worker::model::spread`]).
    Spread,
}

/// A memory size in GiB from the command line: a finite number ≥ 0.
pub fn gib(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a size in GiB: give a number ≥ 0, such as 4 or 0.5")),
    }
}

/// Calibration data for a scoring pass. Defaults: [`ScoreSpec::default`], the same a sweep's
/// score job gets.
#[derive(Args, Clone)]
pub struct CalibrationArgs {
    /// Calibration text: JSON lines / json.gz with a `text` field (C4), Parquet with a `text`
    /// column, or plain text.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use the first N documents (the paper averaged over 10k C4 validation samples).
    #[arg(long, default_value_t = ScoreSpec::default().samples)]
    pub samples: usize,
    /// Truncate each document to its first T tokens; the distance is taken at the last one.
    #[arg(long, default_value_t = ScoreSpec::default().seq_len)]
    pub seq_len: usize,
    /// Sequences per forward pass (right-padded).
    #[arg(long, default_value_t = ScoreSpec::default().batch)]
    pub batch: usize,
}

impl CalibrationArgs {
    /// The scoring pass these flags describe; `None` without `--data`.
    pub fn spec(&self) -> Option<ScoreSpec> {
        let data = self.data.clone()?;
        Some(ScoreSpec { data, samples: self.samples, seq_len: self.seq_len, batch: self.batch })
    }
}
