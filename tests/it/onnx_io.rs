//! Lossless model I/O: round trips on every exported model, unknown fields, IR versions,
//! external data (copied when saving elsewhere, never left dangling), and a > 2 GiB tensor.

use crate::common::*;
use dagr_inject::onnx::{self, proto::tensor_proto::DataLocation, proto::StringStringEntryProto};
use dagr_inject::runtime::Backend;
use protobuf::Message;

#[test]
fn every_model_round_trips_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    for path in models() {
        let m = onnx::load(&path).unwrap();
        let out = dir.path().join(path.file_name().unwrap());
        onnx::save(&m, &out).unwrap();
        let again = onnx::load(&out).unwrap();
        assert_eq!(m.proto, again.proto, "{} changed in a round trip", path.display());
        // Serialization is deterministic: saving the reloaded model gives the same bytes.
        let out2 = dir.path().join("again.onnx");
        onnx::save(&again, &out2).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(),
            "{}: unstable bytes",
            path.display()
        );
    }
}

#[test]
fn unknown_fields_survive() {
    let path = root().join("models/av_mlp.legacy.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    // Field 1000, wire type 2 (length-delimited), 3 bytes: a field no ONNX version defines.
    let extra = [0xc2u8, 0x3e, 0x03, b'x', b'y', b'z'];
    bytes.extend_from_slice(&extra);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("with_unknown.onnx");
    std::fs::write(&src, &bytes).unwrap();
    let m = onnx::load(&src).unwrap();
    let out = dir.path().join("out.onnx");
    onnx::save(&m, &out).unwrap();
    let saved = std::fs::read(&out).unwrap();
    assert!(
        saved.windows(extra.len()).any(|w| w == extra),
        "the unknown field was dropped"
    );
}

#[test]
fn ir_versions_7_to_14_load_and_save() {
    let dir = tempfile::tempdir().unwrap();
    let base = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    for ir in 7..=14 {
        let mut m = base.clone();
        m.proto.ir_version = ir;
        m.source = None;
        let p = dir.path().join(format!("ir{ir}.onnx"));
        onnx::save(&m, &p).unwrap();
        assert_eq!(onnx::load(&p).unwrap().proto, m.proto);
    }
}

#[test]
fn external_data_is_kept_reachable_and_runs() {
    let src_dir = tempfile::tempdir().unwrap();
    let path = root().join("models/av_mlp.legacy.onnx");
    let inline = onnx::load(&path).unwrap();
    externalize(&inline, src_dir.path(), "ext.onnx");
    let m = onnx::load(&src_dir.path().join("ext.onnx")).unwrap();
    assert!(!onnx::io::external_tensors(&m.proto).is_empty());

    // Saving into another directory copies the data file; the copy loads and runs.
    let other = tempfile::tempdir().unwrap();
    let moved = other.path().join("moved.onnx");
    onnx::save(&m, &moved).unwrap();
    assert!(
        other.path().join("weights.bin").exists(),
        "external data was not copied"
    );
    let again = onnx::load(&moved).unwrap();
    assert_eq!(again.proto, m.proto);
    let feed = model_inputs(&path);
    for backend in BACKENDS {
        let want = run(backend, &path, &feed, &["logits".to_string()]);
        let got = run(backend, &moved, &feed, &["logits".to_string()]);
        assert_eq!(want, got, "{}: external-data model differs", backend.name());
        // Where the model's directory is not writable, a scratch copy (for verify, run, eval)
        // goes to a temporary directory with the data linked or copied beside it.
        let scratch = onnx::io::Scratch::beside_linked_data(&m).unwrap();
        assert!(!scratch.path().starts_with(src_dir.path()));
        assert!(scratch.path().with_file_name("weights.bin").exists());
        let got = run(backend, scratch.path(), &feed, &["logits".to_string()]);
        assert_eq!(want, got, "{}: scratch copy differs", backend.name());
    }
    let _ = Backend::Tract;
}

#[test]
fn dangling_or_escaping_external_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let inline = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    externalize(&inline, dir.path(), "ext.onnx");
    std::fs::remove_file(dir.path().join("weights.bin")).unwrap();
    let e = onnx::load(&dir.path().join("ext.onnx")).unwrap_err().to_string();
    assert!(e.contains("weights.bin") && e.contains("does not exist"), "{e}");

    let mut m = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    let t = &mut m.graph_mut().initializer[0];
    t.data_location = DataLocation::EXTERNAL.into();
    let mut e = StringStringEntryProto::new();
    e.key = "location".into();
    e.value = "../../etc/passwd".into();
    t.external_data.push(e);
    let p = dir.path().join("escape.onnx");
    std::fs::write(&p, m.proto.write_to_bytes().unwrap()).unwrap();
    let e = onnx::load(&p).unwrap_err().to_string();
    assert!(e.contains("outside the model's directory"), "{e}");
}

#[test]
fn a_tensor_over_2_gib_in_external_data_loads_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = onnx::load(&root().join("models/av_mlp.legacy.onnx")).unwrap();
    m.source = None;
    m.base_dir = dir.path().to_path_buf();
    let big: u64 = (1 << 31) + 4096;
    // A sparse file: no disk is used for the zeros, and loading must not read it.
    let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    f.set_len(big).unwrap();
    let mut t = onnx::tensor::f32_tensor("big_weight", &[(big / 4) as i64], &[]);
    t.data_location = DataLocation::EXTERNAL.into();
    for (k, v) in [("location", "big.bin".to_string()), ("length", big.to_string())] {
        let mut e = StringStringEntryProto::new();
        e.key = k.into();
        e.value = v;
        t.external_data.push(e);
    }
    m.graph_mut().initializer.push(t);
    let p = dir.path().join("big.onnx");
    onnx::save(&m, &p).unwrap();
    assert!(
        std::fs::metadata(&p).unwrap().len() < 1 << 20,
        "the weights must not be inlined"
    );
    let loaded = onnx::load(&p).unwrap();
    let r = dagr_inject::inspect::report(&loaded).unwrap();
    assert!(r.parameters > (1 << 29));
    assert!(r.external_data);
    // Saving next to itself keeps the reference; no copy of the data is made.
    let p2 = dir.path().join("big2.onnx");
    onnx::save(&loaded, &p2).unwrap();
    assert_eq!(onnx::load(&p2).unwrap().proto, loaded.proto);
}

#[test]
fn saving_over_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.onnx");
    std::fs::copy(root().join("models/av_mlp.legacy.onnx"), &p).unwrap();
    let m = onnx::load(&p).unwrap();
    let e = onnx::save(&m, &p).unwrap_err().to_string();
    assert!(e.contains("refusing to overwrite"), "{e}");
    // Nor over its external data.
    let ext = dir.path().join("ext");
    std::fs::create_dir(&ext).unwrap();
    let m = externalize(&onnx::load(&p).unwrap(), &ext, "m.onnx");
    let weights = ext.join("weights.bin");
    let before = std::fs::read(&weights).unwrap();
    let e = onnx::save(&m, &weights).unwrap_err().to_string();
    assert!(e.contains("refusing to overwrite") && e.contains("weights.bin"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}
