//! Rewriting the results file without losing the sections pasted into it from other benches.

use super::OWN_SECTIONS;

/// `new` (a [`render`]ed report) followed by the sections of `old` that no run of the suite
/// writes, so that rewriting the results file does not lose them.
pub fn keep_pasted_sections(new: &str, old: &str) -> String {
    let mut md = new.trim_end().to_owned();
    md.push('\n');
    let pasted = sections(old).into_iter().filter(|section| {
        !OWN_SECTIONS
            .iter()
            .any(|own| section.lines().next().is_some_and(|h| h.starts_with(own)))
    });
    for section in pasted {
        md.push('\n');
        md.push_str(section.trim_end());
        md.push('\n');
    }
    md
}

/// The `## ` sections of a Markdown text, each from its heading to the next one.
fn sections(md: &str) -> Vec<&str> {
    let starts: Vec<usize> = md
        .match_indices("## ")
        .map(|(at, _)| at)
        .filter(|&at| at == 0 || md.as_bytes()[at - 1] == b'\n')
        .collect();
    starts
        .iter()
        .zip(starts.iter().skip(1).copied().chain([md.len()]))
        .map(|(&start, end)| &md[start..end])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{super::ROUTER_HEADING, *};

    #[test]
    fn a_rewrite_keeps_the_pasted_sections_and_replaces_its_own() {
        let old = "# gpuswap benchmark results\n\n- Date: then\n\n## Targets\n\nold targets\n\n\
                   ## Warm weights (cold vs warmed)\nwarm table\n### a subsection\nmore\n\n\
                   ## Stop\n\nold stop\n\n## Endpoint picker (gpuswap-epp)\npicker table\n";
        let new = "# gpuswap benchmark results\n\n- Date: now\n\n## Targets\n\nnew targets\n\n\
                   ## Stop\n\nnew stop\n";
        let kept = keep_pasted_sections(new, old);
        assert!(kept.starts_with(new), "{kept}");
        for pasted in [
            "## Warm weights (cold vs warmed)\nwarm table\n### a subsection\nmore\n",
            "## Endpoint picker (gpuswap-epp)\npicker table\n",
        ] {
            assert_eq!(kept.matches(pasted).count(), 1, "{kept}");
        }
        assert!(
            !kept.contains("old targets") && !kept.contains("old stop"),
            "{kept}"
        );
        // The suite's router section is its own: a run without the router drops it.
        let old = format!("{new}\n{ROUTER_HEADING}\n\nold race\n");
        assert_eq!(keep_pasted_sections(new, &old), new);
    }
}
