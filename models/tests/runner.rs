//! The runner against onnxruntime's reference outputs, and every way a model can be wrong.
// Every test here reads ONNX; the NNEF-only build checks its path in the runner's unit tests.
#![cfg(feature = "onnx")]

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use spillway_models::{LoadedModel, ModelError, ModelFormat, zoo};

#[derive(Deserialize)]
struct Reference {
    windows: Vec<Vec<f32>>,
    outputs: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct Meta {
    version: u32,
    input_shape: Vec<usize>,
    score_output: String,
    anomaly_threshold: f32,
}

fn zoo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("zoo")
        .join(name)
}

fn reference(model: &str) -> Reference {
    let text = std::fs::read_to_string(zoo_file(&format!("{model}.reference.json")))
        .expect("reference file");
    serde_json::from_str(&text).expect("reference json")
}

#[test]
fn tract_matches_onnxruntime_on_every_zoo_model_from_onnx_and_from_nnef() {
    for (model, bytes, format) in zoo::ALL.into_iter().flat_map(|m| {
        [
            (m, m.onnx, ModelFormat::Onnx),
            (m, m.nnef, ModelFormat::Nnef),
        ]
    }) {
        let loaded = LoadedModel::from_bytes(bytes)
            .unwrap_or_else(|e| panic!("{} {format}: {e}", model.name));
        assert_eq!(loaded.format(), format);
        let runner = loaded
            .optimize(None)
            .unwrap_or_else(|e| panic!("{} {format}: {e}", model.name));
        assert_eq!(runner.input_shape(), model.input_shape);
        let reference = reference(model.name);
        assert!(!reference.windows.is_empty());
        for (i, window) in reference.windows.iter().enumerate() {
            let outputs = runner.run(window).expect("run");
            for output in &outputs {
                let expected = &reference.outputs[&output.name][i];
                assert_eq!(
                    output.data.len(),
                    expected.len(),
                    "{} {}",
                    model.name,
                    output.name
                );
                for (got, want) in output.data.iter().zip(expected) {
                    assert!(
                        (got - want).abs() <= 1e-4,
                        "{} ({format}) window {i} output {}: tract {got} vs onnxruntime {want}",
                        model.name,
                        output.name
                    );
                }
            }
        }
    }
}

#[test]
fn zoo_constants_match_the_exported_metadata() {
    for model in zoo::ALL {
        let text =
            std::fs::read_to_string(zoo_file(&format!("{}.meta.json", model.name))).expect("meta");
        let meta: Meta = serde_json::from_str(&text).expect("meta json");
        assert_eq!(meta.version, model.version);
        assert_eq!(meta.input_shape, model.input_shape);
        assert_eq!(meta.score_output, model.score_output);
        assert_eq!(meta.anomaly_threshold, model.anomaly_threshold);
        let on_disk = std::fs::read(zoo_file(&format!("{}.onnx", model.name))).expect("onnx");
        assert_eq!(on_disk, model.onnx);
        // The NNEF files are conversions of these ONNX files by this tract: the conversion
        // writes the same bytes for the same model, so a stale file shows here.
        let converted = LoadedModel::from_bytes(model.onnx)
            .and_then(|m| m.to_nnef(Some(model.input_shape)))
            .expect("converts");
        assert!(
            converted == model.nnef,
            "models/zoo/{0}.nnef.tar is stale: cloud-hub model convert models/zoo/{0}.onnx \
             --input-shape {1} -o models/zoo/{0}.nnef.tar",
            model.name,
            model
                .input_shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}

#[test]
fn open_batch_dimension_is_fixed_from_config_or_defaults_to_one() {
    let loaded = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx).expect("load");
    assert_eq!(loaded.declared_input_shape(), Some(vec![None, Some(128)]));
    let runner = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize(Some(&[4, 128])))
        .expect("batch of four");
    let outputs = runner.run(&vec![0.1; 4 * 128]).expect("run");
    assert_eq!(outputs[0].shape, vec![4, 1]);
}

#[test]
fn configured_shape_that_contradicts_the_model_is_refused() {
    let err = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize(Some(&[1, 256])))
        .expect_err("256 does not fit 128");
    assert!(matches!(err, ModelError::InputShape(_)), "{err}");
}

#[test]
fn unreadable_file_is_reported_with_its_path() {
    let err = LoadedModel::from_path("/nonexistent/model.onnx").expect_err("missing");
    assert!(matches!(err, ModelError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.onnx"));
}

#[test]
fn bytes_that_are_not_onnx_are_refused() {
    for junk in [
        &b"this is not a protobuf at all \xff\xfe"[..],
        &b""[..],
        &[0x0a, 0xff, 0xff, 0xff][..],
    ] {
        let err = LoadedModel::from_bytes(junk).expect_err("junk");
        assert!(matches!(err, ModelError::NotOnnx(_)), "{err}");
    }
}

#[test]
fn broken_nnef_archives_are_refused_and_its_shape_is_fixed() {
    let whole = zoo::VIBRATION_AE.nnef;
    assert_eq!(ModelFormat::detect(whole), ModelFormat::Nnef);
    // Cut inside the first entry, and gzip's magic number over junk.
    for junk in [&whole[..700], &[0x1f, 0x8b, 0x08, 0x00, 0xde, 0xad][..]] {
        assert_eq!(ModelFormat::detect(junk), ModelFormat::Nnef);
        let err = LoadedModel::from_bytes(junk).expect_err("broken");
        assert!(matches!(err, ModelError::NotNnef(_)), "{err}");
    }
    // The conversion fixed the input shape but for the batch: another window does not fit.
    let loaded = LoadedModel::from_bytes(whole).expect("load");
    assert_eq!(loaded.declared_input_shape(), Some(vec![None, Some(128)]));
    let err = loaded
        .optimize(Some(&[1, 256]))
        .expect_err("256 does not fit 128");
    assert!(matches!(err, ModelError::InputShape(_)), "{err}");
}

#[test]
fn unsupported_operator_is_named() {
    // The autoencoder with its Tanh nodes renamed to an operator no runtime knows.
    let mut bytes = zoo::VIBRATION_AE.onnx.to_vec();
    let needle = b"Tanh";
    let mut replaced = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i..i + needle.len()].copy_from_slice(b"Tanx");
            replaced += 1;
        }
        i += 1;
    }
    assert!(replaced > 0);
    let err = LoadedModel::from_bytes(&bytes).expect_err("Tanx is not an operator");
    match err {
        ModelError::UnsupportedOperator(ops) => assert_eq!(ops, vec!["Tanx".to_owned()]),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn wrong_input_length_is_a_shape_mismatch_not_a_panic() {
    let runner = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize(None))
        .expect("load");
    let err = runner.run(&[0.0; 100]).expect_err("100 is not 128");
    assert!(
        matches!(
            err,
            ModelError::ShapeMismatch {
                expected: 128,
                got: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn one_runner_serves_many_threads_with_identical_results() {
    let runner = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize(None))
        .expect("load");
    let reference = Arc::new(reference("vibration-ae"));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let runner = runner.clone();
            let reference = Arc::clone(&reference);
            std::thread::spawn(move || {
                for round in 0..50 {
                    let i = (t * 7 + round) % reference.windows.len();
                    let score = runner.run(&reference.windows[i]).expect("run")[0].data[0];
                    assert!((score - reference.outputs["score"][i][0]).abs() <= 1e-4);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

#[test]
fn a_batched_call_gives_each_window_what_it_gets_alone_from_onnx_and_from_nnef() {
    for (model, bytes) in zoo::ALL
        .into_iter()
        .flat_map(|m| [(m, m.onnx), (m, m.nnef)])
    {
        let runner = LoadedModel::from_bytes(bytes)
            .and_then(|m| m.optimize_batched(None, &[8, 2, 4, 8]))
            .unwrap_or_else(|e| panic!("{}: {e}", model.name));
        assert_eq!(runner.batch_sizes(), vec![1, 2, 4, 8], "{}", model.name);
        assert_eq!(runner.input_shape(), model.input_shape);
        let reference = reference(model.name);
        // 15 windows: calls of 8, 4, 2 and 1.
        let windows: Vec<&[f32]> = (0..15)
            .map(|i| reference.windows[i % reference.windows.len()].as_slice())
            .collect();
        let together = runner.run_batch(&windows).expect("batched run");
        assert_eq!(together.len(), windows.len());
        for (i, (window, got)) in windows.iter().zip(&together).enumerate() {
            let alone = runner.run(window).expect("run");
            assert_eq!(got.len(), alone.len());
            for (g, a) in got.iter().zip(&alone) {
                assert_eq!((&g.name, &g.shape), (&a.name, &a.shape), "{}", model.name);
                let expected = &reference.outputs[&g.name][i % reference.windows.len()];
                for ((g, a), e) in g.data.iter().zip(&a.data).zip(expected) {
                    assert!(
                        (g - a).abs() <= 1e-5 * a.abs().max(1.0),
                        "{}: {g} vs {a}",
                        model.name
                    );
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{}: {g} vs {e}",
                        model.name
                    );
                }
            }
        }
        // Dropping sizes keeps the plan for one window, and the answers (but for rounding: 15
        // windows now go as 4, 4, 4, 1, 1, 1).
        let fewer = runner.with_batches(|b| b == 4);
        assert_eq!(fewer.batch_sizes(), vec![1, 4]);
        let again = fewer.run_batch(&windows).expect("run");
        for (a, t) in again.iter().flatten().zip(together.iter().flatten()) {
            assert_eq!((&a.name, &a.shape), (&t.name, &t.shape));
            for (a, t) in a.data.iter().zip(&t.data) {
                assert!((a - t).abs() <= 1e-5 * t.abs().max(1.0), "{a} vs {t}");
            }
        }
    }
}

#[test]
fn batches_need_an_open_batch_dimension_holding_one_window() {
    // Four windows per input already: no plans for more.
    let runner = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize_batched(Some(&[4, 128]), &[2, 4]))
        .expect("batch of four");
    assert_eq!(runner.batch_sizes(), vec![1]);
    assert_eq!(runner.max_batch(), 1);
    // Each input of a batched call is checked like a single one, and fails the call.
    let runner = LoadedModel::from_bytes(zoo::VIBRATION_AE.onnx)
        .and_then(|m| m.optimize_batched(None, &[2]))
        .expect("load");
    let good = vec![0.1; 128];
    let short = vec![0.1; 100];
    let err = runner
        .run_batch(&[&good, &short])
        .expect_err("a short window");
    assert!(
        matches!(err, ModelError::ShapeMismatch { got: 100, .. }),
        "{err}"
    );
    assert_eq!(
        runner.run_batch(&[]).expect("nothing to run"),
        Vec::<Vec<_>>::new()
    );
}
