//! Reading the references in `../shared/fixtures`, shared by the model tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// The JSON that `python3 -c script args...` prints; the test fails with a
/// hint to install `packages` (space-separated pip names) when the script does.
pub fn python_json(script: &str, args: &[&std::ffi::OsStr], packages: &str) -> Value {
    let run = std::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        run.status.success(),
        "{packages} are required for this test: python3 -m pip install {packages}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("the script's JSON")
}

/// Tiny random checkpoints of `archs` (see the script for the choices) with
/// references from transformers, in the fixtures' format, each in a
/// subdirectory named after its arch, built in one run of
/// `stages/tests/support/tiny_arch.py` from tiny-qwen2's sizes and tokenizer.
/// The script is found beside the sources this test was built from or, for
/// a test binary carried to another machine, under the working directory.
pub fn tiny_archs(archs: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let rel = "tests/support/tiny_arch.py";
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let script = if built.is_file() {
        built
    } else {
        Path::new("stages").join(rel)
    };
    let run = std::process::Command::new("python3")
        .arg(&script)
        .arg(archs.join(","))
        .arg(fixture("tiny-qwen2"))
        // The script writes a lone arch into the directory it is given.
        .arg(match archs {
            [one] => out.path().join(one),
            _ => out.path().to_owned(),
        })
        .output()
        .expect("python3");
    assert!(
        run.status.success(),
        "{} failed (it needs torch and transformers: python3 -m pip install torch transformers):\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

/// `../shared`, beside the checkout, or `$ANNEAL_SHARED` (for a test binary
/// carried to another machine).
pub fn shared() -> PathBuf {
    let p = std::env::var_os("ANNEAL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    assert!(
        p.join("fixtures").is_dir(),
        "{} is missing: tests need the shared reference directory beside the checkout",
        p.display()
    );
    p
}

/// `../shared/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

/// A JSON file.
pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every tensor of `dir/reference.safetensors` as (shape, f64 values).
pub fn reference(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// The reference batch: right-padded ids, attention mask, labels.
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<bool>>,
    pub labels: Vec<Vec<i64>>,
}

/// The batch stored in `reference.safetensors`.
pub fn batch(r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>) -> Batch {
    let (shape, ids) = &r["input_ids"];
    let (b, t) = (shape[0], shape[1]);
    let rows = |v: &Vec<f64>| -> Vec<Vec<f64>> {
        (0..b).map(|i| v[i * t..(i + 1) * t].to_vec()).collect()
    };
    Batch {
        ids: rows(ids)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect(),
        mask: rows(&r["attention_mask"].1)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x != 0.0).collect())
            .collect(),
        labels: rows(&r["labels"].1)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as i64).collect())
            .collect(),
    }
}

/// Largest |got - want| over the positions where `mask` is true, for `[b, t, v]` logits.
pub fn max_diff_unpadded(got: &[f32], want: &[f64], mask: &[Vec<bool>], t: usize, v: usize) -> f64 {
    let mut worst = 0f64;
    for (bi, row) in mask.iter().enumerate() {
        for (ti, &m) in row.iter().enumerate() {
            if m {
                let off = (bi * t + ti) * v;
                for k in 0..v {
                    worst = worst.max((got[off + k] as f64 - want[off + k]).abs());
                }
            }
        }
    }
    worst
}

/// CUDA device 0 when this machine has an NVIDIA driver, else `None` (the
/// CUDA tests then pass without running; they say so on stderr).
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<burn::backend::cuda::CudaDevice> {
    if Path::new("/proc/driver/nvidia/version").exists() {
        Some(anneal_stages::model::device::gpu_device(0))
    } else {
        eprintln!("no NVIDIA driver on this machine: CUDA test skipped");
        None
    }
}

/// The wgpu device standing in for CUDA (feature `gpu-on-wgpu`).
#[cfg(all(feature = "gpu-on-wgpu", not(feature = "cuda")))]
pub fn gpu() -> Option<burn::backend::wgpu::WgpuDevice> {
    Some(anneal_stages::model::device::gpu_device(0))
}
