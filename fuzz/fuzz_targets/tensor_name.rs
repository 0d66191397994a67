//! The tensor-name parser (any UTF-8 string), plus the TuPaTE layer key built from its result.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peftdb::object::parse_tensor_name;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let loc = parse_tensor_name(s);
        let _ = peftdb::embed::layer_key(&loc.module, &loc.role);
        // Deterministic.
        assert_eq!(format!("{loc:?}"), format!("{:?}", parse_tensor_name(s)));
    }
});
