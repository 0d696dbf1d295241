//! `sqlx::migrate!` embeds `../migrations` when `db.rs` compiles, and cargo does not know that
//! directory: without this, a new migration file is left out of the binaries until the crate
//! happens to compile again (sqlx's documented build script).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
