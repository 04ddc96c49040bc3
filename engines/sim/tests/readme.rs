//! `engines/sim/README.md` prints the strategy tables the engines replay from; this test fails when the two
//! drift. `VIRTLAB_BLESS=1 cargo test -p virtlab-engines --test readme` rewrites the README's copy.

use virtlab_engines::{engine, strategy, Options};

const BEGIN: &str =
    "<!-- begin strategy table: generated from the engines' tables (`virtlab engines --table --markdown`) -->";
const END: &str = "<!-- end strategy table -->";

#[test]
fn the_readme_table_is_the_engines_tables() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme.find(BEGIN).expect("README.md has the strategy table's begin marker") + BEGIN.len();
    let end = readme[start..].find(END).expect("README.md has the strategy table's end marker") + start;
    let generated = format!("\n{}", strategy::markdown(&engine::tables(&Options::default())));
    if readme[start..end] == generated {
        return;
    }
    if std::env::var_os("VIRTLAB_BLESS").is_some() {
        let updated = format!("{}{generated}{}", &readme[..start], &readme[end..]);
        let temp = path.with_extension("md.tmp");
        std::fs::write(&temp, updated).unwrap();
        std::fs::rename(&temp, &path).unwrap();
        return;
    }
    panic!(
        "engines/sim/README.md's strategy table differs from the engines' tables; run \
         `VIRTLAB_BLESS=1 cargo test -p virtlab-engines --test readme` and review the diff"
    );
}
