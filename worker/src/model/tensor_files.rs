//! An HF checkpoint's safetensors files, read one tensor at a time.
//!
//! Opening reads only each file's header (names, dtypes, shapes, offsets) and checks that the
//! file holds every byte the header promises. [`TensorFiles::load`] then reads exactly one
//! tensor's bytes and puts them on the target device, so loading a model holds at most one
//! tensor in host memory beyond what the model itself keeps there: a 70B checkpoint loads onto a
//! GPU through a host that could not hold it, and a bf16 model loads on a CPU without an f32 copy
//! of the whole file first. Plain reads rather than a memory map: the same peak, and no `unsafe`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};

use super::{candle_message, ModelError};

/// safetensors' own cap on a header's size.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// One file: where its data starts, and its tensors.
#[derive(Debug)]
struct File {
    path: PathBuf,
    data_start: u64,
}

/// The tensors of one or more safetensors files (an HF checkpoint's shards), by name.
#[derive(Debug)]
pub struct TensorFiles {
    files: Vec<File>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

fn corrupt(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Corrupt { path: path.to_path_buf(), message: message.into() }
}

impl TensorFiles {
    /// Reads the headers of `paths`; a name found in several files is taken from the last.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let (data_start, metadata) = read_header(path)?;
            for (name, info) in metadata.tensors() {
                tensors.insert(name, (index, info.clone()));
            }
            files.push(File { path: path.clone(), data_start });
        }
        Ok(TensorFiles { files, tensors })
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's shape, from the header.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, info)| info.shape.as_slice())
    }

    /// Reads tensor `name` (in its stored dtype) onto `device`; `None` if there is no such tensor.
    pub fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>, ModelError> {
        let Some((index, info)) = self.tensors.get(name) else { return Ok(None) };
        let file = &self.files[*index];
        let (begin, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - begin];
        let mut f = std::fs::File::open(&file.path).map_err(|e| ModelError::io(&file.path, e))?;
        f.seek(SeekFrom::Start(file.data_start + begin as u64))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| ModelError::io(&file.path, e))?;
        let view = TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(|e| corrupt(&file.path, format!("tensor `{name}`: {e}")))?;
        let tensor =
            view.load(device).map_err(|e| corrupt(&file.path, format!("tensor `{name}`: {}", candle_message(&e))))?;
        Ok(Some(tensor))
    }
}

/// The offset where `path`'s tensor data starts, and its header; checks that the file is as long
/// as the header says (a truncated download fails here, naming the file).
fn read_header(path: &Path) -> Result<(u64, Metadata), ModelError> {
    let not_safetensors = |why: String| corrupt(path, format!("{why} (truncated or not a safetensors file?)"));
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| not_safetensors(format!("{len} bytes: no header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > len {
        return Err(not_safetensors(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| ModelError::io(path, e))?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| not_safetensors(format!("unreadable header: {e}")))?;
    let data_len = metadata.tensors().values().map(|info| info.data_offsets.1).max().unwrap_or(0) as u64;
    if 8 + n + data_len != len {
        return Err(not_safetensors(format!(
            "the header describes {} bytes of tensor data, the file holds {}",
            data_len,
            len - 8 - n
        )));
    }
    Ok((8 + n, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn tensors_come_back_one_at_a_time_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let (one, two) = (dir.path().join("1.safetensors"), dir.path().join("2.safetensors"));
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &one).unwrap();
        candle_core::safetensors::save(&HashMap::from([("b".to_string(), b.clone())]), &two).unwrap();
        let files = TensorFiles::open(&[one.clone(), two]).unwrap();
        let mut names: Vec<&str> = files.names().collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(files.shape("a"), Some(&[3usize, 4][..]));
        let got = files.load("a", &Device::Cpu).unwrap().unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let got = files.load("b", &Device::Cpu).unwrap().unwrap();
        assert_eq!(got.dtype(), DType::BF16, "stored dtype kept");
        assert!(files.load("c", &Device::Cpu).unwrap().is_none());

        // A truncated file is refused when opened, naming it.
        let bytes = std::fs::read(&one).unwrap();
        std::fs::write(&one, &bytes[..bytes.len() - 4]).unwrap();
        let e = TensorFiles::open(std::slice::from_ref(&one)).unwrap_err().to_string();
        assert!(e.contains("1.safetensors") && e.contains("truncated or not a safetensors file?"), "{e}");
        std::fs::write(&one, b"not a checkpoint").unwrap();
        let e = TensorFiles::open(&[one]).unwrap_err().to_string();
        assert!(e.contains("truncated or not a safetensors file?"), "{e}");
    }
}
