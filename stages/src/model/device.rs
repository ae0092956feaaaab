//! Run-time device selection: `cpu` (burn's Flex backend) or `cuda[:N]`
//! (burn's CUDA backend, when built with the `cuda` feature).

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::{Mutex, Once};

use super::backend::TrainBackend;
use anyhow::bail;

/// Where models run, as written in pipeline params (`device: cuda:1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU backend.
    #[default]
    Cpu,
    /// CUDA device `N`.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!("device '{other}' is not one of: cpu, cuda, cuda:N (N a GPU index)"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// CPU backend with autodiff (inference uses its inner backend).
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// The backend `device: cuda` runs on: burn's CUDA backend.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;

/// The backend `device: cuda` runs on: burn's wgpu backend, standing in for
/// CUDA to check the GPU code paths without an NVIDIA GPU (feature
/// `gpu-on-wgpu`; never in a release).
#[cfg(all(feature = "gpu-on-wgpu", not(feature = "cuda")))]
pub type Gpu = burn::backend::Wgpu;

/// [`Gpu`] with autodiff.
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
pub type CudaBackend = burn::backend::Autodiff<Gpu>;

/// Device `n` of [`Gpu`].
#[cfg(feature = "cuda")]
pub fn gpu_device(n: usize) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(n)
}

/// Device `n` of [`Gpu`] (wgpu's own choice for device 0).
#[cfg(all(feature = "gpu-on-wgpu", not(feature = "cuda")))]
pub fn gpu_device(n: usize) -> burn::backend::wgpu::WgpuDevice {
    match n {
        0 => burn::backend::wgpu::WgpuDevice::default(),
        n => burn::backend::wgpu::WgpuDevice::DiscreteGpu(n),
    }
}

/// Work generic over the backend, run by [`run_on`] on the device asked for.
pub trait OnDevice {
    /// What the work returns.
    type Output;
    /// Does the work on backend `B`, device `device`.
    fn run<B: TrainBackend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

/// Runs `work` on `spec`, with a clear error when the device cannot be used.
pub fn run_on<W: OnDevice>(spec: DeviceSpec, work: W) -> anyhow::Result<W::Output> {
    match spec {
        DeviceSpec::Cpu => work.run::<CpuBackend>(Default::default()),
        DeviceSpec::Cuda(n) => run_cuda(n, work),
    }
}

#[cfg(not(any(feature = "cuda", feature = "gpu-on-wgpu")))]
fn run_cuda<W: OnDevice>(n: usize, _work: W) -> anyhow::Result<W::Output> {
    bail!(
        "device 'cuda:{n}' asked for, but this anneal was built without CUDA support; \
         rebuild with `cargo build --release --features cuda`, or set device: cpu"
    )
}

#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
fn run_cuda<W: OnDevice>(n: usize, work: W) -> anyhow::Result<W::Output> {
    #[cfg(feature = "cuda")]
    cuda_driver_check()?;
    let device = gpu_device(n);
    // burn's CUDA runtime panics (on its own threads too) when the device is
    // unusable; turn the first touch into an error.
    let probe = std::panic::catch_unwind(|| {
        let t = burn::tensor::Tensor::<CudaBackend, 1>::from_floats([1.0f32], &device);
        t.into_data()
    });
    if let Err(e) = probe {
        bail!(
            "device 'cuda:{n}' cannot be used: {}; check `nvidia-smi`, CUDA_VISIBLE_DEVICES \
             and that CUDA_PATH points at a CUDA toolkit (NVRTC compiles kernels at run time)",
            panic_text(e.as_ref())
        );
    }
    catch_gpu_panics(n, || work.run::<CudaBackend>(device))
}

/// The first panic message of this process since [`catch_gpu_panics`] began,
/// from any thread: burn's GPU runtime fails on its own threads, and what the
/// calling thread then reports is a consequence, not the cause.
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn panic_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Runs GPU work, turning a panic (out of memory above all) into an error
/// that names its first cause and what to change.
#[cfg_attr(not(any(feature = "cuda", feature = "gpu-on-wgpu")), allow(dead_code))]
fn catch_gpu_panics<T>(n: usize, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut first) = FIRST_PANIC.lock()
                && first.is_none()
            {
                *first = Some(panic_text(info.payload()));
            }
            default(info);
        }));
    });
    if let Ok(mut first) = FIRST_PANIC.lock() {
        *first = None;
    }
    let payload = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => return r,
        Err(p) => p,
    };
    let first = FIRST_PANIC
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .unwrap_or_else(|| panic_text(payload.as_ref()));
    // cubecl appends a backtrace to some messages; what comes before says it.
    let cause = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| {
            !(l.starts_with(|c: char| c.is_ascii_digit()) || l.to_lowercase().contains("backtrace"))
        })
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let lower = cause.to_lowercase();
    if [
        "out of memory",
        "out-of-memory",
        "can't allocate",
        "cannot allocate",
    ]
    .iter()
    .any(|p| lower.contains(p))
    {
        bail!(
            "device 'cuda:{n}' ran out of memory ({cause}); lower the batch size \
             (per_device_train_batch_size, or batch_size when generating) or cutoff_len, \
             or train with bf16: true"
        );
    }
    bail!("the GPU runtime failed on device 'cuda:{n}': {cause}")
}

/// Fails with a readable message when the NVIDIA driver library is missing.
#[cfg(feature = "cuda")]
fn cuda_driver_check() -> anyhow::Result<()> {
    let name = c"libcuda.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed right away.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    if handle.is_null() {
        bail!(
            "device 'cuda' asked for, but the NVIDIA driver (libcuda.so.1) cannot be loaded on this \
             machine; run on a machine with an NVIDIA GPU and driver, or set device: cpu"
        );
    }
    // SAFETY: handle came from dlopen above.
    unsafe { libc::dlclose(handle) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        let e = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains("cpu, cuda, cuda:N"), "{e}");
    }

    #[test]
    fn a_gpu_thread_running_out_of_memory_becomes_an_error_naming_it() {
        let e = catch_gpu_panics(1, || -> anyhow::Result<()> {
            // As burn's runtime does: its device thread fails first, then the
            // caller, on the broken channel.
            let device = std::thread::spawn(|| {
                panic!(
                    "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 268435456\nNo backtrace available"
                )
            });
            assert!(device.join().is_err());
            panic!("the device thread is gone");
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("device 'cuda:1' ran out of memory (called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 268435456); lower the batch size"),
            "{e}"
        );
        // cubecl's LaunchError::OutOfMemory text.
        let e = catch_gpu_panics(0, || -> anyhow::Result<()> {
            panic!(
                "An out-of-memory error happened during launch\nCaused by:\n  pool full\nBacktrace\n  0: x"
            )
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("device 'cuda:0' ran out of memory (An out-of-memory error happened during launch Caused by: pool full); "),
            "{e}"
        );
        let e = catch_gpu_panics(0, || -> anyhow::Result<()> { panic!("kernel failed") })
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the GPU runtime failed on device 'cuda:0': kernel failed"
        );
        assert_eq!(catch_gpu_panics(0, || Ok(7)).unwrap(), 7);
    }

    #[cfg(not(any(feature = "cuda", feature = "gpu-on-wgpu")))]
    #[test]
    fn cuda_without_feature_is_an_error() {
        struct Nothing;
        impl OnDevice for Nothing {
            type Output = ();
            fn run<B: TrainBackend>(self, _d: B::Device) -> anyhow::Result<()> {
                Ok(())
            }
        }
        let e = run_on(DeviceSpec::Cuda(0), Nothing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("built without CUDA"), "{e}");
    }
}
