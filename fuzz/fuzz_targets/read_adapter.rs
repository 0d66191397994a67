//! The adapter folder reader (config JSON + safetensors, all formats): the input is split into an
//! adapter_config.json and a weights file written to a scratch folder; reading must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peftdb::object::formats::ReadOptions;
use peftdb::object::read_adapter;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftdb-fuzz-read-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    // Layout: u16 LE config length | config | weights. The first byte of the weights picks the file name.
    if data.len() < 3 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, rest) = data[2..].split_at(n);
    let dir = scratch();
    for f in ["adapter_model.safetensors", "adapter.safetensors"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let (name, weights) = match rest.split_first() {
        Some((b, w)) if b & 1 == 1 => ("adapter.safetensors", w),
        Some((_, w)) => ("adapter_model.safetensors", w),
        None => ("adapter_model.safetensors", rest),
    };
    std::fs::write(dir.join(name), weights).unwrap();
    if let Ok(obj) = read_adapter(&dir, &ReadOptions::default()) {
        // Whatever is accepted can be hashed and embedded without panicking.
        let _ = peftdb::store::content_hash(&obj);
        let _ = peftdb::embed::tupate(&obj);
    }
});
