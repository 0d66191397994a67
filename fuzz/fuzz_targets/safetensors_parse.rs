//! The validating safetensors reader: never panics, and whatever it accepts is consistent (tensor bytes =
//! shape x dtype size) and survives a write/read round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peftdb::object::safetensors_io::{parse, serialize};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = parse(data) {
        for t in &f.tensors {
            assert_eq!(t.data.len(), t.numel() * t.dtype.size());
        }
        let again = parse(&serialize(&f.tensors, f.metadata.as_ref())).expect("re-read");
        assert_eq!(again, f);
    }
});
