//! Building a [`PolicySet`] from files, reusing the parse of every file whose name and content
//! did not change since a previous set (the set in force).
//!
//! An apply at mesh scale changes one small file among hundreds; parsing YAML is most of the
//! cost of a set, so only new or changed files are parsed. A set keeps its declarations once,
//! in its flat lists (`services`, `routes`, `authorization`), and remembers where each file's
//! declarations sit ([`FileParts`]): that is the file's parse, copied from the previous set's
//! lists for an unchanged file. A reused parse is exactly what parsing would give: parsing
//! depends on the content alone, and a previous set only exists if every one of its files
//! parsed. Validation skips the checks the previous set passed with the same inputs (an
//! unchanged file's own checks while every service's name, namespace and protocol are
//! unchanged, and cross-file checks the previous set proves clean: `validate_cache`); every
//! other check runs over the whole set.

use std::ops::Range;

use super::validate::{self, FileView};
use super::validate_cache::Reuse;
use super::{
    index, parse_file, transparent, version, AuthorizationPolicy, Mesh, PolicyError, PolicyErrors,
    PolicyFile, PolicySet, Route, Service, SourceFile, MAX_FILES,
};

/// Where one file's declarations sit in its set's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileParts {
    /// The file defines `mesh:` (the set's mesh: a valid set has at most one).
    defines_mesh: bool,
    pub(super) services: Range<usize>,
    pub(super) routes: Range<usize>,
    pub(super) authorization: Range<usize>,
}

/// One file's parse: fresh, or that of the `i`th file of the previous set.
enum Parse<'p> {
    Fresh(Box<PolicyFile>),
    Reused(&'p PolicySet, usize),
}

/// What [`build`] made, which files (in sorted order) it had to parse, and which it had to
/// validate again (the others' per-file checks were passed by `previous`: `validate_cache`).
pub(super) struct Built {
    pub(super) set: PolicySet,
    pub(super) parsed: Vec<bool>,
    pub(super) validated: Vec<bool>,
}

/// Parses (or reuses from `previous`) and validates `files` as one set, sorted by name first.
pub(super) fn build(
    mut files: Vec<SourceFile>,
    previous: Option<&PolicySet>,
) -> Result<Built, PolicyErrors> {
    if files.len() > MAX_FILES {
        return Err(PolicyErrors(vec![PolicyError::Parse {
            file: "(set)".to_owned(),
            line: 1,
            field: "(files)".to_owned(),
            reason: format!("{} policy files, at most {MAX_FILES}", files.len()),
        }]));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut parses = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in &files {
        if let Some((prev, i)) = previous.and_then(|p| Some((p, unchanged(p, file)?))) {
            parses.push(Parse::Reused(prev, i));
            continue;
        }
        match parse_file(file) {
            Ok(p) => parses.push(Parse::Fresh(Box::new(p))),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let parsed: Vec<bool> = parses
        .iter()
        .map(|p| matches!(p, Parse::Fresh(_)))
        .collect();
    // The first files that are, in order, the previous set's first files (version states).
    let shared = parses
        .iter()
        .enumerate()
        .take_while(|(k, p)| matches!(p, Parse::Reused(_, i) if i == k))
        .count();

    let (mut n_services, mut n_routes, mut n_authorization) = (0, 0, 0);
    for parse in &parses {
        let (s, r, a) = match parse {
            Parse::Fresh(p) => (p.services.len(), p.routes.len(), p.authorization.len()),
            Parse::Reused(prev, i) => {
                let parts = &prev.parts[*i];
                (
                    parts.services.len(),
                    parts.routes.len(),
                    parts.authorization.len(),
                )
            }
        };
        n_services += s;
        n_routes += r;
        n_authorization += a;
    }
    let mut services: Vec<Service> = Vec::with_capacity(n_services);
    let mut routes: Vec<Route> = Vec::with_capacity(n_routes);
    let mut authorization: Vec<AuthorizationPolicy> = Vec::with_capacity(n_authorization);
    let mut meshes: Vec<Option<Mesh>> = Vec::with_capacity(parses.len());
    let mut parts = Vec::with_capacity(parses.len());
    for parse in parses {
        let (s, r, a) = (services.len(), routes.len(), authorization.len());
        let mesh = match parse {
            Parse::Fresh(p) => {
                let p = *p;
                services.extend(p.services);
                routes.extend(p.routes);
                authorization.extend(p.authorization);
                p.mesh
            }
            Parse::Reused(prev, i) => {
                let old = &prev.parts[i];
                services.extend_from_slice(&prev.services[old.services.clone()]);
                routes.extend_from_slice(&prev.routes[old.routes.clone()]);
                authorization.extend_from_slice(&prev.authorization[old.authorization.clone()]);
                old.defines_mesh.then(|| prev.mesh.clone())
            }
        };
        parts.push(FileParts {
            defines_mesh: mesh.is_some(),
            services: s..services.len(),
            routes: r..routes.len(),
            authorization: a..authorization.len(),
        });
        meshes.push(mesh);
    }

    let views: Vec<FileView<'_>> = parts
        .iter()
        .zip(&meshes)
        .map(|(p, mesh)| FileView {
            mesh: mesh.as_ref(),
            services: &services[p.services.clone()],
            routes: &routes[p.routes.clone()],
            authorization: &authorization[p.authorization.clone()],
        })
        .collect();
    let reuse = match previous {
        Some(prev) => {
            let reused: Vec<bool> = parsed.iter().map(|p| !p).collect();
            Reuse::new(&reused, &prev.services, &services)
        }
        None => Reuse::none(files.len()),
    };
    validate::validate(&files, &views, &services, &reuse)?;
    drop(views);

    let index = match previous {
        Some(prev) if reuse.facts_unchanged => index::PolicyIndex::reuse(
            &prev.index,
            &prev.routes,
            &prev.authorization,
            &routes,
            &authorization,
        ),
        _ => None,
    }
    .unwrap_or_else(|| {
        std::sync::Arc::new(index::PolicyIndex::build(
            &services,
            &routes,
            &authorization,
        ))
    });
    let mesh = meshes.into_iter().flatten().next().unwrap_or_default();
    // Validation checked the range and that it has room; a failure here leaves the
    // services without one (never reached).
    let range = mesh
        .vip_range
        .as_deref()
        .and_then(|r| transparent::IpRange::parse(r).ok());
    let vips = transparent::allocate_vips(&services, range.as_ref()).unwrap_or_default();
    let (version, version_states) = version::versions(
        &files,
        shared,
        previous.map_or(&[][..], |p| &p.version_states),
    );
    Ok(Built {
        set: PolicySet {
            version,
            version_states,
            files,
            parts,
            mesh,
            services,
            routes,
            authorization,
            index,
            vips,
        },
        parsed,
        validated: reuse.unchanged.iter().map(|u| !u).collect(),
    })
}

/// The index of `file` in `previous` if `previous` holds it with the same name and content.
fn unchanged(previous: &PolicySet, file: &SourceFile) -> Option<usize> {
    let i = previous
        .files
        .binary_search_by(|f| f.name.as_str().cmp(&file.name))
        .ok()?;
    (previous.files[i].content == file.content).then_some(i)
}
