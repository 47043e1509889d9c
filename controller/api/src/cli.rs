//! Command lines written for the reference's Go binaries, made acceptable to ours.
//!
//! Go's `flag` package takes `-name` as well as `--name`; and the reference has flags for
//! features not built here, which an operator's existing manifests pass. [`normalize`] rewrites
//! the first and [`set_aside`] takes out the second, so each can be logged once and change
//! nothing, instead of stopping the binary.

/// A flag of the reference that is accepted and has no effect here.
pub struct Unbuilt {
    pub name: &'static str,
    /// Whether it takes a value (`--name value`); boolean flags take one only as `--name=value`.
    pub takes_value: bool,
    /// Why it changes nothing, for the log.
    pub why: &'static str,
}

/// Rewrites Go-style single-dash long flags (`-port=28888`) to `--port=28888`; short flags are
/// not used, so nothing is ambiguous. Everything after `--` is left alone.
pub fn normalize(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut values_only = false;
    for (i, arg) in args.into_iter().enumerate() {
        let single_dash_long = i > 0
            && !values_only
            && arg.len() > 2
            && arg.starts_with('-')
            && !arg.starts_with("--")
            && arg.as_bytes()[1].is_ascii_alphabetic();
        values_only |= arg == "--";
        out.push(if single_dash_long {
            format!("-{arg}")
        } else {
            arg
        });
    }
    out
}

/// Removes the flags in `unbuilt` (with their values) from normalized `args`; returns what is
/// left and the flags found, each once, in the order first given.
pub fn set_aside(
    args: Vec<String>,
    unbuilt: &'static [Unbuilt],
) -> (Vec<String>, Vec<&'static Unbuilt>) {
    let mut kept = Vec::with_capacity(args.len());
    let mut found: Vec<&'static Unbuilt> = Vec::new();
    let mut iter = args.into_iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            kept.push(arg);
            kept.extend(iter.by_ref());
            break;
        }
        let Some(body) = arg.strip_prefix("--") else {
            kept.push(arg);
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        let Some(flag) = unbuilt.iter().find(|u| u.name == name) else {
            kept.push(arg);
            continue;
        };
        if flag.takes_value && !inline {
            iter.next();
        }
        if !found.iter().any(|f| f.name == flag.name) {
            found.push(flag);
        }
    }
    (kept, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNBUILT: &[Unbuilt] = &[
        Unbuilt {
            name: "snapshot-registry",
            takes_value: true,
            why: "snapshots",
        },
        Unbuilt {
            name: "metrics-secure",
            takes_value: false,
            why: "tls",
        },
    ];

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn go_style_flags_become_long_flags() {
        let args = normalize(strings(&["bin", "-port=1", "-mode", "uri", "--", "-x"]));
        assert_eq!(args, ["bin", "--port=1", "--mode", "uri", "--", "-x"]);
    }

    #[test]
    fn unbuilt_flags_are_taken_out_with_their_values() {
        let (kept, found) = set_aside(
            strings(&[
                "bin",
                "--snapshot-registry",
                "r.example",
                "--port=1",
                "--metrics-secure",
                "--keep",
                "--snapshot-registry=again",
                "--metrics-secure=false",
                "--",
                "--metrics-secure",
            ]),
            UNBUILT,
        );
        assert_eq!(
            kept,
            ["bin", "--port=1", "--keep", "--", "--metrics-secure"]
        );
        let names: Vec<_> = found.iter().map(|f| f.name).collect();
        assert_eq!(names, ["snapshot-registry", "metrics-secure"]);
    }
}
