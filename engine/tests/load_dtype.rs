//! `dtype` is honoured or refused at load, never accepted and ignored: each backend serves the
//! dtype it computes in (float32 on the CPU), `auto` picks it, and any other value is refused
//! before a weight is read, with an error naming the field, the value and what is served.

use std::path::PathBuf;
use std::time::Duration;

use llmd_engine::{EngineError, EngineHandle, LoadOptions};
use llmd_models::ModelError;
use llmd_options::{Backend, Device, Dtype, DtypeChoice};

fn options(dtype: DtypeChoice) -> LoadOptions {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2");
    let mut opts = LoadOptions::new(path, "qwen2");
    opts.device = Device::Cpu;
    opts.dtype = dtype;
    opts.cpu_kv_cache_bytes = 4 << 20;
    opts
}

#[test]
fn the_cpu_serves_float32_and_auto() {
    for dtype in [DtypeChoice::Auto, DtypeChoice::Fixed(Dtype::Float32)] {
        let h = EngineHandle::load(options(dtype), &mut |_| {}).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        // `llmctl ps` shows the dtype computed in, not the checkpoint's.
        assert_eq!((h.info().dtype, h.info().backend), (Dtype::Float32, Backend::Cpu), "{dtype}");
        h.shutdown(Duration::ZERO);
    }
}

#[test]
fn the_cpu_refuses_16_bit_dtypes_before_reading_weights() {
    for (dtype, name) in [(Dtype::Float16, "float16"), (Dtype::BFloat16, "bfloat16")] {
        let mut phases = Vec::new();
        let err = EngineHandle::load(options(DtypeChoice::Fixed(dtype)), &mut |p| phases.push(p.phase))
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted on the CPU"));
        assert!(
            matches!(
                err,
                EngineError::Model(ModelError::UnservedDtype { requested, backend: Backend::Cpu, serves: Dtype::Float32 })
                    if requested == dtype
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "`dtype` = {name} is not served by the CPU backend (it computes in float32); use dtype = \"auto\" or \"float32\""
            )
        );
        assert!(phases.is_empty(), "refused only after {phases:?}");
    }
}
