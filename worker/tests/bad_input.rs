//! Bad checkpoints and bad requests give one-line errors that name the file and the problem.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{fixture, load_err};
use prunesweep_worker::model::Model;

/// A writable copy of the tiny llama fixture.
fn copy_tiny(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dst.join(f)).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_path() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = load_err(&tmp.path().join("nope"));
    assert!(msg.contains("nope") && msg.contains("no such file"), "{msg}");
}

#[test]
fn folder_without_model_files() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("config.json") && msg.contains(".gguf"), "{msg}");
}

#[test]
fn missing_weights_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("tokenizer.json") && msg.contains("missing"), "{msg}");
    copy_tiny(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("model.safetensors") && msg.contains("missing"), "{msg}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    let f = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
}

#[test]
fn shape_mismatch_between_config_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    edit_config(tmp.path(), |c| c["intermediate_size"] = 96.into());
    let msg = load_err(tmp.path());
    assert!(msg.contains("model.safetensors") && msg.contains("mlp") && msg.contains("[96, 64]"), "{msg}");
}

#[test]
fn config_with_fewer_layers_than_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    edit_config(tmp.path(), |c| c["num_hidden_layers"] = 3.into());
    let msg = load_err(tmp.path());
    assert!(msg.contains("model.layers.3") && msg.contains("num_hidden_layers = 3"), "{msg}");
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    edit_config(tmp.path(), |c| {
        c["model_type"] = "gemma2".into();
        c["architectures"] = serde_json::json!(["Gemma2ForCausalLM"]);
    });
    let msg = load_err(tmp.path());
    assert!(msg.contains("config.json") && msg.contains("gemma2") && msg.contains("supported: llama"), "{msg}");
}

#[test]
fn invalid_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(tmp.path());
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains("config.json") && msg.contains("invalid JSON"), "{msg}");
}

#[test]
fn impossible_layer_drops() {
    let mut model = Model::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let msg = model.decoder.remove_layers(&[4]).unwrap_err().to_string();
    assert!(msg.contains("layer 4") && msg.contains("0-3"), "{msg}");
    let msg = model.decoder.remove_layers(&[0, 1, 2, 3]).unwrap_err().to_string();
    assert!(msg.contains("keep at least one"), "{msg}");
    let msg = model.decoder.remove_layers(&[1, 1]).unwrap_err().to_string();
    assert!(msg.contains("twice"), "{msg}");
    assert_eq!(model.decoder.num_blocks(), 4, "a failed drop changes nothing");
    model.decoder.remove_layers(&[1]).unwrap();
    let msg = model.decoder.remove_layers(&[1]).unwrap_err().to_string();
    assert!(msg.contains("0, 2-3"), "{msg}");
}

/// The binary reports the same errors as one line on stderr and a non-zero exit, never a panic.
#[test]
fn cli_reports_errors_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("p.txt");
    std::fs::write(&prompt, "hello").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let out = tmp.path().join("o.safetensors");
    let (out, prompt) = (out.to_str().unwrap(), prompt.to_str().unwrap());
    let (code, err) = run(&["forward", "--model", "/no/such/model", "--prompt-file", prompt, "--out", out]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/no/such/model") && !err.contains("panicked"), "{err}");
    let tiny = fixture("tiny-llama");
    let (code, err) =
        run(&["forward", "--model", tiny.to_str().unwrap(), "--drop", "3:5", "--prompt-file", prompt, "--out", out]);
    assert_eq!(code, Some(1));
    assert!(err.contains("layer 4 is not in the model") && !err.contains("panicked"), "{err}");
    let (code, err) =
        run(&["forward", "--model", tiny.to_str().unwrap(), "--drop", "x", "--prompt-file", prompt, "--out", out]);
    assert_eq!(code, Some(2), "clap rejects a malformed --drop");
    assert!(err.contains("START:N"), "{err}");
    let (code, _) =
        run(&["forward", "--model", tiny.to_str().unwrap(), "--drop", "1:2", "--prompt-file", prompt, "--out", out]);
    assert_eq!(code, Some(0));
    let t = candle_core::safetensors::load(out, &Device::Cpu).unwrap();
    assert_eq!(t["states"].dims(), &[3, 5, 64]);
    assert_eq!(t["logits"].dims(), &[5, 320]);
    assert_eq!(t["ids"].dims(), &[5]);
}

/// `save_hf` never deletes a folder it did not write, nor the model's own folder.
#[test]
fn writer_refuses_foreign_and_source_folders() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tiny(&tmp.path().join("src"));
    let model = Model::load(&tmp.path().join("src"), &Device::Cpu).unwrap();
    let msg = model.save_hf(&tmp.path().join("src"), &[]).unwrap_err().to_string();
    assert!(msg.contains("own folder"), "{msg}");
    let foreign = tmp.path().join("notes");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "keep me").unwrap();
    let msg = model.save_hf(&foreign, &[]).unwrap_err().to_string();
    assert!(msg.contains("not written by prunesweep"), "{msg}");
    assert!(foreign.join("thesis.tex").is_file());
    let out = tmp.path().join("out");
    model.save_hf(&out, &[("prunesweep.json", serde_json::json!({}))]).unwrap();
    model.save_hf(&out, &[]).unwrap(); // replacing our own output is fine
}
