//! `worker doctor`: what this build and this machine have — version, CUDA in the build or not,
//! each CUDA device with its free/total memory, host memory — and, with `--device`, whether that
//! device is usable (a small bf16 product through cuBLAS and candle's kernels on CUDA). Exits
//! non-zero, with the reason in plain words, when the device asked for is not usable.

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use prunesweep_worker::device::{self, DeviceInfo};

/// `worker doctor [--device cpu|cuda|cuda:N]`
#[derive(Args)]
pub struct DoctorArgs {
    /// Also check that this device works (cpu, cuda or cuda:N): exits non-zero if it does not.
    #[arg(long)]
    pub device: Option<String>,
}

/// Runs `worker doctor`.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    println!("worker {}", device::version_line());
    if device::cuda_compiled() {
        match device::BUILT_COMPUTE_CAP {
            Some(cap) => println!("build: CUDA, kernels for compute capability {} ({})", dotted(cap), sm_arch(cap)),
            None => println!("build: CUDA"),
        }
    } else {
        println!("build: CPU only (scripts/build-cuda.sh builds a CUDA worker)");
    }
    match (device::cpu_available_bytes(), device::cpu_total_bytes()) {
        (Some(free), Some(total)) => println!(
            "cpu: {} threads, {} available of {}",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            gib(free),
            gib(total)
        ),
        _ => println!("cpu: memory unknown (no /proc/meminfo)"),
    }
    let devices = device::cuda_devices();
    match &devices {
        Ok(list) => {
            println!("cuda: {} device{}", list.len(), if list.len() == 1 { "" } else { "s" });
            for d in list {
                println!("  {}", describe(d));
                if let Some(warning) = arch_warning(d) {
                    println!("    warning: {warning}");
                }
            }
        }
        Err(e) => println!("cuda: unavailable: {e}"),
    }

    let Some(name) = args.device.as_deref() else { return Ok(()) };
    match name {
        "cpu" => check(&Device::Cpu, name),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().with_context(|| format!("device `{name}`: expected cuda:N"))?,
            };
            let info = device::cuda_device(ordinal).map_err(|e| anyhow!("device {name} is not usable: {e}"))?;
            if let Some(warning) = arch_warning(&info) {
                bail!("device {name} is not usable: {warning}");
            }
            let dev = Device::new_cuda(ordinal)
                .map_err(|e| anyhow!("device {name} is not usable: candle could not open it: {e}"))?;
            check(&dev, name)
        }
        other => bail!("device `{other}` is not known; use cpu, cuda or cuda:N"),
    }
}

/// A bf16 64×64 product of ones summed in f32 (fills, a cuBLAS GEMM, a cast, a reduction):
/// 64³ when the device computes.
fn check(dev: &Device, name: &str) -> anyhow::Result<()> {
    let result = (|| -> candle_core::Result<f32> {
        let ones = Tensor::ones((64, 64), DType::BF16, dev)?;
        ones.matmul(&ones)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()
    })()
    .map_err(|e| anyhow!("device {name} is not usable: a 64x64 bf16 product failed: {e}"))?;
    if result != 262_144.0 {
        bail!("device {name} is not usable: a 64x64 bf16 product of ones summed to {result}, not 262144");
    }
    let free = device::free_memory(dev).map_or_else(|| "unknown".into(), gib);
    println!("{name}: ok (bf16 product checked; {free} free)");
    Ok(())
}

/// `cuda:0  NVIDIA H200  compute 9.0  139.5 GiB free of 140.0 GiB`
fn describe(d: &DeviceInfo) -> String {
    let (major, minor) = d.compute_capability;
    format!(
        "cuda:{}  {}  compute {major}.{minor}  {} free of {}",
        d.ordinal,
        d.name,
        gib(d.free_bytes),
        gib(d.total_bytes)
    )
}

/// Whether this build's kernels load on `d`. candle's build (cudaforge) compiles them for
/// `CUDA_COMPUTE_CAP`, adding the arch-specific suffix from 9.0 on (`90` → `sm_90a`): such code
/// runs on that exact compute capability only; below 9.0, on that one and newer.
fn arch_warning(d: &DeviceInfo) -> Option<String> {
    let cap = device::BUILT_COMPUTE_CAP?;
    let built: u32 = cap.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse().ok()?;
    let (major, minor) = d.compute_capability;
    let here = major * 10 + minor;
    let fits = if built >= 90 { here == built } else { here >= built };
    (!fits).then(|| {
        format!(
            "this build's kernels are for compute capability {} ({}) and cuda:{} is {major}.{minor}; \
             rebuild with CUDA_COMPUTE_CAP={here} scripts/build-cuda.sh",
            dotted(cap),
            sm_arch(cap),
            d.ordinal
        )
    })
}

/// The architecture nvcc was given for `CUDA_COMPUTE_CAP` = `cap`, as cudaforge picks it:
/// `80` → `sm_80`, `90` → `sm_90a`, `120` → `sm_120a`, `121` → `sm_121f`; an explicit suffix stays.
fn sm_arch(cap: &str) -> String {
    let Ok(base) = cap.parse::<u32>() else { return format!("sm_{cap}") };
    match base {
        b if b > 120 => format!("sm_{b}f"),
        b if b >= 90 => format!("sm_{b}a"),
        b => format!("sm_{b}"),
    }
}

/// `"90"` → `"9.0"`, `"100"` → `"10.0"`.
fn dotted(cap: &str) -> String {
    let digits = cap.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    match digits.len() {
        0 | 1 => cap.to_string(),
        n => format!("{}.{}", &digits[..n - 1], &digits[n - 1..]),
    }
}

/// Bytes as GiB with one decimal.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capabilities_read_as_cudaforge_builds_them() {
        assert_eq!(dotted("90"), "9.0");
        assert_eq!(dotted("100"), "10.0");
        assert_eq!(dotted("90a"), "9.0");
        assert_eq!(sm_arch("80"), "sm_80");
        assert_eq!(sm_arch("90"), "sm_90a");
        assert_eq!(sm_arch("121"), "sm_121f");
        assert_eq!(sm_arch("90a"), "sm_90a");
        assert_eq!(gib(3 << 30), "3.0 GiB");
    }
}
