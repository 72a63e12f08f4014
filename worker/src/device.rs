//! What this build and this machine have: whether the worker was compiled with CUDA, which CUDA
//! devices the driver shows and how much of their memory is free, and how much memory a device
//! has free for a job (the contract's `free_memory_bytes`). `worker doctor` prints all of it.
//!
//! A CUDA build (`--features cuda`, see `scripts/build-cuda.sh`) asks the driver through candle's
//! own copy of cudarc; a build without CUDA answers every CUDA question with
//! [`DeviceError::NotCompiled`], which says how to get a CUDA build.

use candle_core::Device;

/// The compute capability the CUDA kernels were compiled for (`CUDA_COMPUTE_CAP` at build time,
/// e.g. `"90"`), where the build set it; `None` in a build without CUDA, or where candle found
/// it with `nvidia-smi` instead.
#[cfg(feature = "cuda")]
pub const BUILT_COMPUTE_CAP: Option<&str> = option_env!("CUDA_COMPUTE_CAP");
/// The compute capability the CUDA kernels were compiled for (`CUDA_COMPUTE_CAP` at build time,
/// e.g. `"90"`), where the build set it; `None` in a build without CUDA, or where candle found
/// it with `nvidia-smi` instead.
#[cfg(not(feature = "cuda"))]
pub const BUILT_COMPUTE_CAP: Option<&str> = None;

/// Where the memory model places a job on `device`: host memory for a CPU, device memory
/// otherwise.
pub fn placement(device: &Device) -> prunesweep_proto::memory::Placement {
    use prunesweep_proto::memory::Placement;
    if device.is_cpu() {
        Placement::Cpu
    } else {
        Placement::Cuda
    }
}

/// Whether this binary was built with CUDA (the `cuda` feature).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// The build in a few words, for `--version`: `0.1.0 (cuda: no)`, `0.1.0 (cuda: yes, sm_90)`.
pub fn version_line() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        let version = env!("CARGO_PKG_VERSION");
        match (cuda_compiled(), BUILT_COMPUTE_CAP) {
            (false, _) => format!("{version} (cuda: no)"),
            (true, Some(cap)) => format!("{version} (cuda: yes, sm_{cap})"),
            (true, None) => format!("{version} (cuda: yes)"),
        }
    })
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its index: `cuda:N` (after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// Its name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for an H100/H200.
    pub compute_capability: (u32, u32),
    /// Its memory in bytes.
    pub total_bytes: u64,
    /// Its free memory in bytes, at the time of asking.
    pub free_bytes: u64,
}

/// Why CUDA cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The binary was built without the `cuda` feature.
    #[error(
        "this worker was built without CUDA; build a CUDA worker with scripts/build-cuda.sh \
         (or `cargo build --release -p prunesweep-worker --features cuda` where a CUDA toolkit is installed)"
    )]
    NotCompiled,
    /// The driver library that was loaded is the link-time stub, not a driver.
    #[error(
        "no NVIDIA driver here (libcuda is the link stub): run on a machine with the NVIDIA driver \
         (R580 / CUDA 13.0 or newer), and keep the stub's folder off LD_LIBRARY_PATH"
    )]
    StubDriver,
    /// The driver sees no device.
    #[error(
        "no CUDA device: the NVIDIA driver sees none (check nvidia-smi, and CUDA_VISIBLE_DEVICES={})",
        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
    )]
    NoDevice,
    /// A device index past the last device.
    #[error("no CUDA device cuda:{ordinal}: this machine shows {count} (cuda:0 .. cuda:{last})", last = count.saturating_sub(1))]
    NoSuchDevice {
        /// The index asked for.
        ordinal: usize,
        /// How many devices there are.
        count: usize,
    },
    /// The driver is there but cannot serve this build (an older driver, or a kernel-module /
    /// library mismatch).
    #[error(
        "the NVIDIA driver cannot run this build ({code} from {call}): it needs a driver for \
         CUDA 13.0 or newer (R580+), with its kernel module and libcuda.so.1 of the same version"
    )]
    DriverMismatch {
        /// The driver call that failed.
        call: &'static str,
        /// The driver's error code, e.g. `CUDA_ERROR_SYSTEM_DRIVER_MISMATCH`.
        code: String,
    },
    /// Any other driver failure.
    #[error("CUDA driver call {call} failed: {code} ({message})")]
    Driver {
        /// The driver call that failed.
        call: &'static str,
        /// The driver's error code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        code: String,
        /// The driver's description of it.
        message: String,
    },
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{DeviceError, DeviceInfo};
    use candle_core::cuda_backend::cudarc::driver::{sys::CUresult, CudaContext, DriverError};

    impl DeviceError {
        /// The plain-words error for a failed driver call.
        pub(super) fn from_driver(call: &'static str, err: DriverError) -> Self {
            let code = format!("{:?}", err.0);
            match err.0 {
                CUresult::CUDA_ERROR_STUB_LIBRARY => DeviceError::StubDriver,
                CUresult::CUDA_ERROR_NO_DEVICE => DeviceError::NoDevice,
                CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
                | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
                | CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => DeviceError::DriverMismatch { call, code },
                _ => {
                    let message = err
                        .error_string()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| "no description".into());
                    DeviceError::Driver { call, code, message }
                }
            }
        }
    }

    pub(super) fn device_count() -> Result<usize, DeviceError> {
        let count = CudaContext::device_count().map_err(|e| DeviceError::from_driver("cuDeviceGetCount", e))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    pub(super) fn device_info(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
        // The device's primary context (shared with candle's, if it has one): free memory is a
        // per-context question.
        let ctx = CudaContext::new(ordinal).map_err(|e| DeviceError::from_driver("cuDevicePrimaryCtxRetain", e))?;
        let name = ctx.name().map_err(|e| DeviceError::from_driver("cuDeviceGetName", e))?;
        let (major, minor) =
            ctx.compute_capability().map_err(|e| DeviceError::from_driver("cuDeviceGetAttribute", e))?;
        let (free, total) = ctx.mem_get_info().map_err(|e| DeviceError::from_driver("cuMemGetInfo", e))?;
        Ok(DeviceInfo {
            ordinal,
            name,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            total_bytes: total as u64,
            free_bytes: free as u64,
        })
    }

    pub(super) fn free_bytes(device: &candle_core::CudaDevice) -> Option<u64> {
        let (free, _) = device.cuda_stream().context().mem_get_info().ok()?;
        Some(free as u64)
    }

    pub(super) fn total_bytes(device: &candle_core::CudaDevice) -> Option<u64> {
        let (_, total) = device.cuda_stream().context().mem_get_info().ok()?;
        Some(total as u64)
    }
}

/// Every CUDA device the driver shows, with its name and free/total memory. Errors say plainly
/// why there are none: no CUDA in this build, no driver (the link stub), no device, a driver too
/// old for the build.
pub fn cuda_devices() -> Result<Vec<DeviceInfo>, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        let count = cuda::device_count()?;
        if count == 0 {
            return Err(DeviceError::NoDevice);
        }
        (0..count).map(cuda::device_info).collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(DeviceError::NotCompiled)
    }
}

/// One CUDA device, `cuda:ordinal`; [`DeviceError::NoSuchDevice`] past the last one.
pub fn cuda_device(ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        let count = cuda::device_count()?;
        if count == 0 {
            return Err(DeviceError::NoDevice);
        }
        if ordinal >= count {
            return Err(DeviceError::NoSuchDevice { ordinal, count });
        }
        cuda::device_info(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(DeviceError::NotCompiled)
    }
}

/// Free memory where `device` keeps its tensors, in bytes: on CUDA the device's free memory (in
/// its context), on the CPU the kernel's MemAvailable. `None` where it cannot be told.
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => cpu_available_bytes(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda::free_bytes(cuda),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The bytes of a model's blocks each of `devices` can take when they are spread over them
/// ([`crate::model::Decoder::spread`]): 90% of its free memory (as measured now, so after the
/// embedding and LM head are loaded on the first), shared evenly by the entries naming the same
/// device (`cpu,cpu` halves the host's). Where free memory cannot be told, the devices share
/// without a limit.
pub fn room_for_blocks(devices: &[Device]) -> Vec<u64> {
    devices
        .iter()
        .map(|device| {
            let entries = devices.iter().filter(|d| d.same_device(device)).count() as u64;
            match free_memory(device) {
                Some(free) => free / 10 * 9 / entries,
                None => u64::MAX / devices.len() as u64,
            }
        })
        .collect()
}

/// All the memory where `device` keeps its tensors, in bytes (the GPU's, or the host's); `None`
/// where it cannot be told.
pub fn total_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => cpu_total_bytes(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda::total_bytes(cuda),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Host memory available for new allocations without swapping (MemAvailable in /proc/meminfo),
/// in bytes; `None` where there is no /proc/meminfo.
pub fn cpu_available_bytes() -> Option<u64> {
    meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable")
}

/// Host memory in all (MemTotal in /proc/meminfo), in bytes.
pub fn cpu_total_bytes() -> Option<u64> {
    meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

/// A `Key:   123 kB` line of /proc/meminfo, in bytes.
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut fields = rest.split_whitespace();
        let value: u64 = fields.next()?.parse().ok()?;
        match fields.next() {
            Some("kB") => Some(value * 1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_free_memory_is_known() {
        let free = free_memory(&Device::Cpu).expect("MemAvailable");
        assert!(free > 0);
        assert!(free <= cpu_total_bytes().unwrap());
    }

    #[test]
    fn a_device_listed_twice_shares_its_room() {
        let [one] = room_for_blocks(&[Device::Cpu])[..] else { panic!("one room per device") };
        let two = room_for_blocks(&[Device::Cpu, Device::Cpu]);
        assert_eq!(two.len(), 2);
        assert_eq!(two[0], two[1]);
        // MemAvailable moves between the calls: within 5% of half of one.
        assert!((two[0] as f64 - one as f64 / 2.0).abs() < one as f64 * 0.05, "{one} vs {two:?}");
        assert!(one <= free_memory(&Device::Cpu).unwrap());
    }

    #[test]
    fn meminfo_lines_parse() {
        let text = "MemTotal:       16303428 kB\nMemFree:          123 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(12_000_000 * 1024));
        assert_eq!(meminfo_bytes(text, "MemTotal"), Some(16_303_428 * 1024));
        assert_eq!(meminfo_bytes(text, "Mem"), None);
        assert_eq!(meminfo_bytes(text, "SwapTotal"), None);
    }

    #[test]
    fn version_line_says_whether_cuda_is_in() {
        let line = version_line();
        assert!(line.starts_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(line.contains("cuda: yes"), cuda_compiled());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_the_error_says_how_to_build_it() {
        let err = cuda_devices().unwrap_err();
        assert!(matches!(err, DeviceError::NotCompiled));
        assert!(err.to_string().contains("scripts/build-cuda.sh"), "{err}");
        assert!(matches!(cuda_device(0), Err(DeviceError::NotCompiled)));
        assert!(!cuda_compiled());
    }
}
