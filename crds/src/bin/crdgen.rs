//! Writes the CustomResourceDefinitions into `crds/` and the Helm chart's `crds/` folder (or into
//! the one directory given).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dirs = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let chart = here.join("../charts/vectorpipe/crds");
            vec![here, chart]
        }
    };
    for dir in dirs {
        for (name, yaml) in vectorpipe_crds::crd_yaml() {
            let path = dir.join(name);
            std::fs::write(&path, yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
