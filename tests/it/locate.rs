//! Every resolution path of `--encoders`, on models from both PyTorch exporters.

use crate::common::*;
use dagr_inject::locate::{resolve_all, Resolution, ScopeSource};
use dagr_inject::onnx;

fn resolve(model: &str, entries: &[&str]) -> Result<Vec<dagr_inject::locate::Encoder>, String> {
    let m = onnx::load(&root().join("models").join(model)).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let e: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
    resolve_all(&m, &idx, &e).map_err(|e| e.to_string())
}

#[test]
fn scope_prefix_resolves_on_both_exporters() {
    for (model, src, audio, visual) in [
        (
            "av_cnn.legacy.onnx",
            ScopeSource::NodeName,
            "/audio_encoder/fc/Gemm_output_0",
            "/visual_encoder/fc/Gemm_output_0",
        ),
        ("av_cnn.dynamo.onnx", ScopeSource::Metadata, "linear", "linear_1"),
    ] {
        let r = resolve(model, &["audio", "visual"]).unwrap();
        assert_eq!(r[0].tensor, audio, "{model}");
        assert_eq!(r[1].tensor, visual, "{model}");
        assert_eq!(
            r[0].resolution,
            Resolution::Scope {
                scope: "audio_encoder".into(),
                source: src
            }
        );
        assert_eq!(r[0].modality, "audio");
        assert_eq!(r[0].shape, "[batch, 32]");
    }
}

#[test]
fn exact_scope_and_nested_scope() {
    let r = resolve("av_mlp.legacy.onnx", &["audio_encoder", "visual_encoder.fc1"]).unwrap();
    assert_eq!(r[0].tensor, "/audio_encoder/fc2/Gemm_output_0");
    assert_eq!(r[1].tensor, "/visual_encoder/fc1/Gemm_output_0");
    let r = resolve("av_mlp.dynamo.onnx", &["audio_encoder", "visual_encoder.fc1"]).unwrap();
    assert!(matches!(&r[1].resolution, Resolution::Scope { scope, .. } if scope == "visual_encoder.fc1"));
}

#[test]
fn all_three_models_resolve_the_same_on_both_exporters() {
    for base in ["av_mlp", "av_cnn", "tri_token"] {
        let enc: &[&str] = if base == "tri_token" {
            &["audio", "visual", "text"]
        } else {
            &["audio", "visual"]
        };
        let a = resolve(&format!("{base}.legacy.onnx"), enc).unwrap();
        let b = resolve(&format!("{base}.dynamo.onnx"), enc).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.shape, y.shape, "{base}: {} vs {}", x.tensor, y.tensor);
            assert!(matches!(
                x.resolution,
                Resolution::Scope {
                    source: ScopeSource::NodeName,
                    ..
                }
            ));
            assert!(matches!(
                y.resolution,
                Resolution::Scope {
                    source: ScopeSource::Metadata,
                    ..
                }
            ));
        }
    }
}

#[test]
fn explicit_mapping_and_exact_tensor_names() {
    let r = resolve("av_cnn.dynamo.onnx", &["a=linear", "linear_1"]).unwrap();
    assert_eq!(r[0].resolution, Resolution::Explicit);
    assert_eq!(r[0].modality, "a");
    assert_eq!(r[1].resolution, Resolution::TensorName);
    assert_eq!(r[1].tensor, "linear_1");
}

#[test]
fn ambiguous_unknown_and_non_encoder_names_are_clear_errors() {
    let e = resolve("av_cnn.legacy.onnx", &["head", "audio"]).unwrap_err();
    assert!(
        e.contains("ambiguous") && e.contains("head_audio") && e.contains("head_fusion"),
        "{e}"
    );

    let e = resolve("av_cnn.legacy.onnx", &["audoi", "visual"]).unwrap_err();
    assert!(
        e.contains("no tensor or module scope named 'audoi'") && e.contains("audio_encoder"),
        "{e}"
    );

    let e = resolve("av_cnn.legacy.onnx", &["a=audio", "visual"]).unwrap_err();
    assert!(e.contains("graph input"), "{e}");

    let e = resolve("av_cnn.legacy.onnx", &["a=audio_encoder.fc.weight", "visual"]).unwrap_err();
    assert!(e.contains("initializer"), "{e}");

    let e = resolve("av_cnn.legacy.onnx", &["audio", "audio_encoder"]).unwrap_err();
    assert!(e.contains("both resolve to the tensor"), "{e}");
}

#[test]
fn candidates_rank_encoders_above_heads() {
    for model in ["av_cnn.legacy.onnx", "av_cnn.dynamo.onnx", "tri_token.dynamo.onnx"] {
        let m = onnx::load(&root().join("models").join(model)).unwrap();
        let idx = dagr_inject::ops::index(&m).unwrap();
        let c = dagr_inject::locate::candidates(&m, &idx);
        let n = if model.starts_with("tri") { 3 } else { 2 };
        for cand in &c[..n] {
            assert!(cand.pass_as.ends_with("_encoder"), "{model}: {:?}", cand);
        }
        assert!(c[n].pass_as.contains("head"), "{model}: {:?}", c[n]);
    }
}

#[test]
fn a_common_root_of_every_scope_is_dropped() {
    // Keras 3 on its torch backend exports through PyTorch's legacy exporter with every node
    // under `/_wrapped/` (tf2onnx puts every node under the outer model's name): the modules are
    // found below it, by their own names or with the root written out.
    let mut m = onnx::load(&root().join("models/av_cnn.legacy.onnx")).unwrap();
    for n in m.graph_mut().node.iter_mut() {
        if n.name.starts_with('/') {
            n.name = format!("/_wrapped{}", n.name);
        } else {
            n.name = format!("/_wrapped/{}", n.name);
        }
    }
    let idx = dagr_inject::ops::index(&m).unwrap();
    let c = dagr_inject::locate::candidates(&m, &idx);
    let top: Vec<&str> = c[..2].iter().map(|c| c.pass_as.as_str()).collect();
    assert_eq!(top, ["audio_encoder", "visual_encoder"], "{c:?}");
    for entries in [
        ["audio", "visual"],
        ["_wrapped.audio_encoder", "_wrapped.visual_encoder"],
    ] {
        let e: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        let r = resolve_all(&m, &idx, &e).unwrap();
        assert_eq!(r[0].tensor, "/audio_encoder/fc/Gemm_output_0");
        assert_eq!(r[1].tensor, "/visual_encoder/fc/Gemm_output_0");
    }
}

#[test]
fn tf2onnx_helper_nodes_belong_to_the_layer_around_them() {
    // `models/frameworks/keras.rnn.onnx` (export_keras_rnn.py): tf2onnx writes the LSTM as
    // `LSTM__60` between `Transpose`/`Squeeze` helpers, the Conv2D + BatchNorm as `Conv__123`,
    // all without an op path, and names the GRU's Loop condition nodes after the frozen
    // TensorFlow function (`av_1_motion_encoder_1_gru_1_while_cond_frozen_..._av_1/...`). Each
    // encoder is found by its module scope, its output the projection leaving it.
    let m = onnx::load(&root().join("models/frameworks/keras.rnn.onnx")).unwrap();
    let idx = dagr_inject::ops::index(&m).unwrap();
    let names = ["audio_encoder", "visual_encoder", "motion_encoder"];
    let e: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let r = resolve_all(&m, &idx, &e).unwrap();
    for (enc, name) in r.iter().zip(names) {
        assert_eq!(enc.tensor, format!("av_1/{name}_1/fc_1/BiasAdd:0"));
        assert!(matches!(enc.resolution, Resolution::Scope { .. }), "{enc:?}");
    }
    let scopes = dagr_inject::locate::Scopes::of(&m, &idx);
    assert!(
        !scopes.paths.keys().any(|p| p.contains("frozen")),
        "{:?}",
        scopes.paths.keys()
    );
    // The training graph builds with nothing frozen and its gradients pass `verify`'s finite
    // differences (the GRU's Loop runs on ONNX Runtime).
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.onnx");
    let src = root().join("models/frameworks/keras.rnn.onnx");
    cli_train(&src, &names.join(","), &train);
    cli_verify(&train, &src).stdout(predicates::str::contains("all checks passed"));
}
