//! Safetensors checkpoints: one file or shards listed in `model.safetensors.index.json`,
//! read as f32 whatever they are stored in (f32, bf16, f16), written as f32 or bf16.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

/// A tensor on the host, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A 2-d tensor `[rows, cols]` transposed to `[cols, rows]`.
    pub fn transposed(&self) -> HostTensor {
        const BLOCK: usize = 32;
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0f32; r * c];
        // Blocked so both sides stay in cache on large matrices.
        for i0 in (0..r).step_by(BLOCK) {
            for j0 in (0..c).step_by(BLOCK) {
                for i in i0..(i0 + BLOCK).min(r) {
                    for j in j0..(j0 + BLOCK).min(c) {
                        out[j * r + i] = self.data[i * c + j];
                    }
                }
            }
        }
        HostTensor {
            shape: vec![c, r],
            data: out,
        }
    }
}

/// Storage dtype of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

impl SaveDtype {
    /// The name transformers uses in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

/// The safetensors files of a checkpoint directory, in shard order.
pub fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: missing object 'weight_map'", index.display()))?;
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let f = file.as_str().with_context(|| {
                format!("{}: weight_map.{name} must be a file name", index.display())
            })?;
            if !files.iter().any(|x| x == f) {
                files.push(f.to_owned());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json; \
         anneal reads Hugging Face checkpoints in safetensors format \
         (convert .bin files with transformers' save_pretrained(safe_serialization=True))",
        dir.display()
    )
}

/// Every tensor of a checkpoint directory, converted to f32.
pub fn load_dir(dir: &Path) -> anyhow::Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir)? {
        load_file_into(&file, &mut out)?;
    }
    Ok(out)
}

/// Every tensor of one safetensors file, converted to f32, added to `out`.
pub fn load_file_into(file: &Path, out: &mut BTreeMap<String, HostTensor>) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", file.display()))?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            // gpt-oss's MXFP4 blocks and scales, dequantised on load.
            Dtype::U8 => raw.iter().map(|&b| f32::from(b)).collect(),
            other => bail!(
                "{}: tensor '{name}' has dtype {other:?}; only F32, BF16 and F16 weights (and \
                 MXFP4 blocks in U8) are supported",
                file.display()
            ),
        };
        if out.contains_key(&name) {
            bail!(
                "{}: tensor '{name}' appears in more than one shard",
                file.display()
            );
        }
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(())
}

fn encode(t: &HostTensor, dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SaveDtype::Bf16 => t
            .data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// Writes `tensors` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors`
/// shards plus `model.safetensors.index.json` when they exceed `max_shard_bytes`.
/// Returns the files written.
pub fn save_dir(
    dir: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: SaveDtype,
    max_shard_bytes: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let elem = match dtype {
        SaveDtype::F32 => 4u64,
        SaveDtype::Bf16 => 2,
    };
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let bytes = t.data.len() as u64 * elem;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(name);
        size += bytes;
        total += bytes;
    }
    let dt = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let encoded: Vec<(&String, Vec<u8>, &HostTensor)> = names
            .iter()
            .map(|name| (*name, encode(&tensors[*name], dtype), &tensors[*name]))
            .collect();
        let views = encoded
            .iter()
            .map(|(name, bytes, t)| {
                safetensors::tensor::TensorView::new(dt, t.shape.clone(), bytes)
                    .map(|v| (name.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .context("building safetensors views")?;
        let path = dir.join(&file_name);
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for name in names {
            weight_map.insert((*name).clone(), json!(file_name));
        }
        written.push(path);
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = BTreeMap::new();
        for i in 0..5 {
            m.insert(
                format!("t{i}"),
                HostTensor {
                    shape: vec![2, 3],
                    data: (0..6).map(|x| (x + i) as f32 * 0.5).collect(),
                },
            );
        }
        let files = save_dir(dir.path(), &m, SaveDtype::F32, 30).unwrap();
        assert_eq!(files.len(), 6, "five shards and an index");
        assert_eq!(load_dir(dir.path()).unwrap(), m);
        let dir2 = tempfile::tempdir().unwrap();
        save_dir(dir2.path(), &m, SaveDtype::Bf16, u64::MAX).unwrap();
        assert_eq!(
            load_dir(dir2.path()).unwrap(),
            m,
            "halves are exact in bf16"
        );
    }

    #[test]
    fn reads_f16_and_rejects_ints() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [0.5f32, -2.0, 1.25];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![3], &bytes).unwrap();
        let path = dir.path().join("model.safetensors");
        safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
        assert_eq!(load_dir(dir.path()).unwrap()["w"].data, vals);
        let ints = [1u8, 0, 0, 0];
        let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![1], &ints).unwrap();
        safetensors::serialize_to_file([("ids", view)], None, &path).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tensor 'ids' has dtype I32"), "{e}");
        let e = load_dir(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
    }

    #[test]
    fn transpose() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        assert_eq!(t.transposed().data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(t.transposed().transposed(), t);
    }
}
