//! Choosing the compute device: `cpu` (default), `cuda` or `cuda:N` (with the `cuda` feature).

use super::error::{EngineError, EngineResult};
use candle_core::Device;

/// Parse a `--device` value: `cpu`, `cuda`, `cuda:N`.
///
/// `cuda` in a build without the `cuda` feature is an error ([`EngineError::CudaNotCompiled`]), never a
/// silent fallback to the CPU.
pub fn parse_device(spec: &str) -> EngineResult<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>().map_err(|_| EngineError::Device {
            spec: spec.to_string(),
            reason: "expected cuda:N with N a GPU index".into(),
        })?
    } else {
        return Err(EngineError::Device {
            spec: spec.to_string(),
            reason: "expected cpu, cuda or cuda:N".into(),
        });
    };
    cuda_device(spec, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(spec: &str, ordinal: usize) -> EngineResult<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // With RUST_BACKTRACE set, candle appends a backtrace to the message: the cause alone is clearer.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        EngineError::Device {
            spec: spec.to_string(),
            reason: format!("cannot open CUDA device {ordinal}: {e}"),
        }
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> EngineResult<Device> {
    Err(EngineError::CudaNotCompiled {
        requested: spec.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(
            parse_device("tpu"),
            Err(EngineError::Device { .. })
        ));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(EngineError::Device { .. })
        ));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = parse_device("cuda:0").unwrap_err();
        assert!(matches!(e, EngineError::CudaNotCompiled { .. }));
        assert!(e
            .to_string()
            .contains("cargo build --release --features cuda"));
    }
}
