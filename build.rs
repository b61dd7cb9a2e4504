//! CPU builds need nothing from here. The `cuda` feature will compile `kernels/*.cu` to PTX with
//! nvcc and embed it (see kernels/README.md).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
