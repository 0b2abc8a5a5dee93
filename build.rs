fn main() {
    // Nothing is generated; without this line Cargo would rerun the script
    // whenever any file of the package changes.
    println!("cargo:rerun-if-changed=build.rs");
}
