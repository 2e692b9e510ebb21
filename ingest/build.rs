// `sqlx::migrate!` embeds migrations/{sqlite,postgres} at compile time, but
// cargo only knows to rebuild when a file it already embedded changes: a new
// migration would be missed by an incremental build without this.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
