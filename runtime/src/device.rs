//! Run-time backend choice: `--device auto|cpu|wgpu|cuda[:N]` among the backends compiled
//! into the binary (cargo features `ndarray`/`flex`, `wgpu`/`vulkan`/`metal`, `cuda`).
//!
//! Library code is generic over `B: AutodiffBackend`; [`dispatch`] is the one place that
//! names concrete backend types, one `#[cfg]` arm per backend. Inference code uses
//! `B::InnerBackend` (no autodiff graph).

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::AutodiffBackend;

use crate::error::{Result, RuntimeError};

/// The device the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU if one is usable (CUDA, then a hardware wgpu adapter), else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The wgpu backend (Vulkan, Metal, DX12; Mesa lavapipe without a GPU).
    Wgpu,
    /// CUDA device `N`.
    Cuda(usize),
}

impl DeviceChoice {
    /// The device `Auto` stands for on this machine (a GPU if one is usable, else the
    /// CPU); any other choice as it is.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => resolve_auto(),
            other => other,
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "auto" => Self::Auto,
            "cpu" | "ndarray" | "flex" => Self::Cpu,
            "wgpu" | "vulkan" | "metal" | "dx12" | "gpu" => Self::Wgpu,
            "cuda" => Self::Cuda(0),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Self::Cuda(n.parse().map_err(|_| format!("bad CUDA index in `{s}`"))?),
                None => {
                    return Err(format!(
                        "unknown device `{s}`: use auto, cpu, wgpu or cuda[:N]"
                    ))
                }
            },
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Work to run on whichever backend [`dispatch`] picks.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B` and `device`; `label` describes the device for logs.
    fn run<B: AutodiffBackend>(self, device: B::Device, label: &str) -> Self::Output;
}

/// The backends compiled into this binary, in `auto` preference order.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec![];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(any(feature = "ndarray", feature = "flex")) {
        v.push("cpu");
    }
    v
}

/// Keeps Mesa's Vulkan device-selection layer quiet on a machine without a graphical
/// session.
///
/// Listing wgpu adapters (`--device auto` does, to look for a GPU) loads Vulkan's implicit
/// layers; Mesa's device-selection layer then tries a Wayland connection and, where
/// `XDG_RUNTIME_DIR` is unset or not a directory (servers, containers, CI), prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` twice, which reads
/// as a failure of this program. There the layer has no session to choose a GPU for, so
/// it is switched off (`NODEVICE_SELECT=1`, the switch its manifest names); adapters are
/// still all listed, in the drivers' order. A user's own `NODEVICE_SELECT` or
/// `MESA_VK_DEVICE_SELECT` is left alone. Call first thing in `main`, before any other
/// thread starts (it sets an environment variable).
pub fn quiet_headless_vulkan() {
    #[cfg(all(feature = "wgpu", target_os = "linux"))]
    {
        let session = std::env::var_os("XDG_RUNTIME_DIR")
            .is_some_and(|dir| std::path::Path::new(&dir).is_dir());
        let chosen = ["NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if !session && !chosen {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    }
}

/// The wgpu adapters of this machine that Burn's wgpu backend can run on (hardware and
/// software, e.g. Mesa's lavapipe): Vulkan, Metal, DX12. OpenGL adapters are left out, as
/// Burn does not request them (a machine with only an OpenGL/EGL driver has no adapter).
#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

/// Whether a hardware (non-software) wgpu adapter exists.
#[cfg(feature = "wgpu")]
pub fn wgpu_hardware_adapter() -> Option<String> {
    wgpu_adapters()
        .into_iter()
        .find(|info| info.device_type != wgpu::DeviceType::Cpu)
        .map(|info| format!("{} ({:?})", info.name, info.backend))
}

/// The error for `--device wgpu` on a machine where wgpu finds no adapter at all: decided
/// before any work starts (creating a wgpu device there aborts the process).
pub const NO_WGPU_ADAPTER: &str = "no wgpu adapter: install a Vulkan/Metal/DX12 driver, or \
     Mesa's software Vulkan (lavapipe): apt-get install mesa-vulkan-drivers; or use \
     --device cpu";

#[cfg(feature = "cuda")]
fn cuda_usable(index: usize) -> bool {
    use burn::backend::cuda::{Cuda, CudaDevice};
    use burn::tensor::Tensor;
    let probe = std::panic::catch_unwind(|| {
        let t = Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &CudaDevice::new(index));
        t.sum().into_scalar()
    });
    probe.is_ok()
}

fn not_compiled(what: &str) -> RuntimeError {
    RuntimeError::Device(format!(
        "device `{what}` is not compiled into this binary (compiled: {}); rebuild with `--features {what}`",
        compiled_backends().join(", ")
    ))
}

/// Resolves `auto` and runs `task` on the chosen backend, printing which one it uses.
pub fn dispatch<T: BackendTask>(choice: DeviceChoice, task: T) -> Result<T::Output> {
    let resolved = match choice {
        DeviceChoice::Auto => resolve_auto(),
        other => other,
    };
    match resolved {
        DeviceChoice::Cuda(index) => {
            #[cfg(feature = "cuda")]
            {
                use burn::backend::cuda::{Cuda, CudaDevice};
                use burn::backend::Autodiff;
                let label = format!("cuda:{index}");
                eprintln!("device: {label}");
                return Ok(task.run::<Autodiff<Cuda>>(CudaDevice::new(index), &label));
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = index;
                Err(not_compiled("cuda"))
            }
        }
        DeviceChoice::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::{Wgpu, WgpuDevice};
                use burn::backend::Autodiff;
                let adapters = wgpu_adapters();
                if adapters.is_empty() {
                    return Err(RuntimeError::Device(NO_WGPU_ADAPTER.into()));
                }
                let label = match wgpu_hardware_adapter() {
                    Some(name) => format!("wgpu: {name}"),
                    None => format!("wgpu (software adapter: {})", adapters[0].name),
                };
                eprintln!("device: {label}");
                return Ok(task.run::<Autodiff<Wgpu>>(WgpuDevice::default(), &label));
            }
            #[cfg(not(feature = "wgpu"))]
            Err(not_compiled("wgpu"))
        }
        DeviceChoice::Cpu | DeviceChoice::Auto => run_cpu(task),
    }
}

/// Work to run on several devices of one backend (data-parallel training).
pub trait MultiDeviceTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B` over `devices`; `label` describes them for logs.
    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>, label: &str) -> Self::Output;
}

/// Runs `task` over several devices of one backend: `cuda:N` devices (distinct indices), or
/// `cpu` repeated (several replicas on the CPU backend's one device, for tests and small
/// runs). `wgpu` and `auto` are not accepted: name the devices.
pub fn dispatch_many<T: MultiDeviceTask>(choices: &[DeviceChoice], task: T) -> Result<T::Output> {
    if choices.is_empty() {
        return Err(RuntimeError::Device("no device given".into()));
    }
    let label = choices
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if choices.iter().all(|c| *c == DeviceChoice::Cpu) {
        #[cfg(feature = "flex")]
        {
            use burn::backend::flex::Flex;
            use burn::backend::Autodiff;
            eprintln!("devices: {label} (flex)");
            return Ok(task.run::<Autodiff<Flex>>(vec![Default::default(); choices.len()], &label));
        }
        #[cfg(all(feature = "ndarray", not(feature = "flex")))]
        {
            use burn::backend::ndarray::NdArray;
            use burn::backend::Autodiff;
            eprintln!("devices: {label} (ndarray)");
            return Ok(
                task.run::<Autodiff<NdArray>>(vec![Default::default(); choices.len()], &label)
            );
        }
        #[allow(unreachable_code)]
        return Err(not_compiled("ndarray"));
    }
    let mut indices = Vec::with_capacity(choices.len());
    for c in choices {
        match c {
            DeviceChoice::Cuda(i) if !indices.contains(i) => indices.push(*i),
            DeviceChoice::Cuda(i) => {
                return Err(RuntimeError::Device(format!("cuda:{i} is listed twice")))
            }
            other => {
                return Err(RuntimeError::Device(format!(
                    "several devices must all be cuda:N (or all cpu); got `{other}` in `{label}`"
                )))
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        use burn::backend::cuda::{Cuda, CudaDevice};
        use burn::backend::Autodiff;
        eprintln!("devices: {label}");
        let devices = indices.into_iter().map(CudaDevice::new).collect();
        return Ok(task.run::<Autodiff<Cuda>>(devices, &label));
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = indices;
        Err(not_compiled("cuda"))
    }
}

fn resolve_auto() -> DeviceChoice {
    #[cfg(feature = "cuda")]
    if cuda_usable(0) {
        return DeviceChoice::Cuda(0);
    }
    #[cfg(feature = "wgpu")]
    if wgpu_hardware_adapter().is_some() {
        return DeviceChoice::Wgpu;
    }
    DeviceChoice::Cpu
}

#[allow(unreachable_code)]
fn run_cpu<T: BackendTask>(task: T) -> Result<T::Output> {
    #[cfg(feature = "flex")]
    {
        use burn::backend::flex::Flex;
        use burn::backend::Autodiff;
        eprintln!("device: cpu (flex)");
        return Ok(task.run::<Autodiff<Flex>>(Default::default(), "cpu (flex)"));
    }
    #[cfg(feature = "ndarray")]
    {
        use burn::backend::ndarray::NdArray;
        use burn::backend::Autodiff;
        eprintln!("device: cpu (ndarray)");
        return Ok(task.run::<Autodiff<NdArray>>(Default::default(), "cpu (ndarray)"));
    }
    Err(not_compiled("ndarray"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("wgpu".parse(), Ok(DeviceChoice::Wgpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("tpu"));
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }
}
