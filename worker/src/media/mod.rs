//! Media decoding with the ffmpeg CLI, streamed so that long files never sit in memory whole.

pub mod audio;
pub mod frames;
