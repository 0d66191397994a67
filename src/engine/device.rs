//! Choosing the compute device: `cpu` (default), `cuda` or `cuda:N` (with the `cuda` feature).

use super::error::LoadError;
use candle_core::Device;

/// Parse a `--device` value: `cpu`, `cuda`, `cuda:N`.
///
/// `cuda` in a build without the `cuda` feature is an error ([`LoadError::CudaNotCompiled`]), never a
/// silent fallback to the CPU.
pub fn parse_device(spec: &str) -> Result<Device, LoadError> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>().map_err(|_| LoadError::Device {
            spec: spec.to_string(),
            reason: "expected cuda:N with N a GPU index".into(),
        })?
    } else {
        return Err(LoadError::Device {
            spec: spec.to_string(),
            reason: "expected cpu, cuda or cuda:N".into(),
        });
    };
    cuda_device(spec, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(spec: &str, ordinal: usize) -> Result<Device, LoadError> {
    Device::new_cuda(ordinal).map_err(|e| {
        // With RUST_BACKTRACE set, candle appends a backtrace to the message: the cause alone is clearer.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        LoadError::Device {
            spec: spec.to_string(),
            reason: format!("cannot open CUDA device {ordinal}: {e}"),
        }
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> Result<Device, LoadError> {
    Err(LoadError::CudaNotCompiled {
        requested: spec.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(parse_device("tpu"), Err(LoadError::Device { .. })));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(LoadError::Device { .. })
        ));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = parse_device("cuda:0").unwrap_err();
        assert!(matches!(e, LoadError::CudaNotCompiled { .. }));
        assert!(e
            .to_string()
            .contains("cargo build --release --features cuda"));
    }
}
