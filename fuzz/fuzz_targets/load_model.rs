//! Fuzz the model loader and everything that reads an untrusted model before any rewrite:
//! protobuf decoding, validation, the graph index with shape inference, encoder candidates,
//! and encoder resolution. None of it may panic, whatever the bytes.
#![no_main]

use dagr_inject::onnx::{GraphIndex, Model};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(data, Path::new("/nonexistent"), Path::new("fuzz.onnx")) else {
        return;
    };
    let Ok(idx) = GraphIndex::new(&model) else {
        return;
    };
    let _ = dagr_inject::inspect::report(&model);
    let entries = vec!["audio".to_string(), "visual".to_string()];
    let _ = dagr_inject::locate::resolve_all(&model, &idx, &entries);
    let mut m = model.clone();
    let cfg = dagr_inject::Config { encoders: entries, ..Default::default() };
    let _ = dagr_inject::inject(&mut m, &cfg);
});
