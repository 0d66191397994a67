//! The store's value decoding: binary tensor and embedding values, and the JSON records (objects, tasks,
//! spaces, base-model profiles). Never panics; a decoded tensor re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peftdb::store::codec::{decode_f32, decode_tensor, encode_f32, encode_tensor};
use peftdb::store::{BaseModelProfile, ObjectRecord, SpaceRecord, TaskRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = decode_tensor(data) {
        assert_eq!(encode_tensor(&t), data);
    }
    if let Ok(v) = decode_f32(data) {
        assert_eq!(encode_f32(&v), data);
    }
    let _ = serde_json::from_slice::<ObjectRecord>(data);
    let _ = serde_json::from_slice::<TaskRecord>(data);
    let _ = serde_json::from_slice::<SpaceRecord>(data);
    let _ = serde_json::from_slice::<BaseModelProfile>(data);
});
