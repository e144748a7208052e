//! Locates the workspace's binaries in the cargo target directory of the running test.

use std::path::PathBuf;

/// Path of binary `name` built in the same target directory and profile as the running test
/// executable (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
///
/// `WEFT_BIN_DIR` overrides the directory. Panics if the binary is missing, saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("WEFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()
                .unwrap_or_else(|e| panic!("cannot locate the test executable: {e}"));
            let mut dir = exe
                .parent()
                .unwrap_or_else(|| panic!("{} has no parent directory", exe.display()))
                .to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    path
}
