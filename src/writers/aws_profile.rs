//! An AWS shared profile (`~/.aws/credentials` and `~/.aws/config`), read as the AWS CLI reads
//! them, for the settings the object_store crate takes only from the environment: static keys,
//! region and endpoint. The AWS SDK reads profiles fully but would be a large dependency for
//! this; profiles that get their keys from a process, SSO or an assumed role are refused with
//! the command that turns them into variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Keys that make a profile take another identity (a role, SSO); the AWS CLI uses them before
/// any static keys of the same profile.
const ROLE_KEYS: [&str; 4] = [
    "role_arn",
    "sso_session",
    "sso_start_url",
    "web_identity_token_file",
];

/// One profile's settings, the credentials file's before the config file's.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    values: BTreeMap<String, String>,
}

impl Profile {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `(access key id, secret key, session token)` when the profile holds static keys.
    pub fn static_keys(&self) -> Option<(&str, &str, Option<&str>)> {
        Some((
            self.get("aws_access_key_id")?,
            self.get("aws_secret_access_key")?,
            self.get("aws_session_token"),
        ))
    }

    /// The key through which the profile takes another identity, if any.
    pub fn role_source(&self) -> Option<&'static str> {
        ROLE_KEYS.into_iter().find(|k| self.get(k).is_some())
    }

    /// Whether the profile runs a program for its keys (used when it has no static keys).
    pub fn has_credential_process(&self) -> bool {
        self.get("credential_process").is_some()
    }
}

/// The profile named by `AWS_DEFAULT_PROFILE` or `AWS_PROFILE` (botocore's order), else
/// `default`, from the files the AWS CLI reads (`AWS_SHARED_CREDENTIALS_FILE`,
/// `AWS_CONFIG_FILE`, else under `~/.aws`). `None` when the default profile is absent; a profile
/// named explicitly must exist. `env` treats empty variables as unset.
pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Profile>> {
    let named = ["AWS_DEFAULT_PROFILE", "AWS_PROFILE"]
        .into_iter()
        .find_map(|var| env(var).map(|name| (var, name)));
    let name = named
        .as_ref()
        .map_or_else(|| "default".to_string(), |(_, n)| n.clone());
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let credentials_file = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = file("AWS_CONFIG_FILE", ".aws/config");

    let mut values = BTreeMap::new();
    let mut found = false;
    // The credentials file is read last: its keys win over the config file's.
    for (path, in_config) in [(&config_file, true), (&credentials_file, false)] {
        let Some(ini) = path.as_deref().map(read_ini).transpose()?.flatten() else {
            continue;
        };
        // Within a file, the last section naming the profile wins whole, as in botocore: of a
        // config file's `[default]` and `[profile default]`, the later one, never a blend.
        let last = ini
            .iter()
            .rev()
            .find(|(section, _)| section.is_some_and(|s| names_profile(s, &name, in_config)));
        if let Some((_, props)) = last {
            found = true;
            values.extend(props.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        }
    }
    match (found, named) {
        (true, _) => Ok(Some(Profile { name, values })),
        (false, None) => Ok(None),
        (false, Some((var, _))) => Err(Error::usage(
            format!(
                "{var}={name}: no such profile in {} or {}",
                shown(&credentials_file),
                shown(&config_file)
            ),
            format!("check the profile name (`aws configure list-profiles`), or unset {var} and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        )),
    }
}

/// Whether a section header names profile `name`: `[name]` in the credentials file,
/// `[profile name]` in the config file (and `[default]` there too), spaces as the CLI splits them.
fn names_profile(section: &str, name: &str, in_config: bool) -> bool {
    let words: Vec<&str> = section.split_whitespace().collect();
    match (in_config, words.as_slice()) {
        (false, [single]) => *single == name,
        (true, ["profile", single]) => *single == name,
        (true, ["default"]) => name == "default",
        _ => false,
    }
}

/// The file parsed, `None` when it does not exist.
fn read_ini(path: &Path) -> Result<Option<ini::Ini>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "cannot read the AWS profile file", e)),
    };
    // Secret keys may hold backslashes: no escapes, as the AWS CLI reads them.
    ini::Ini::load_from_str_noescape(&text)
        .map(Some)
        .map_err(|e| {
            Error::bad_input(
                path.display().to_string(),
                format!("not a valid AWS profile file: {e}"),
                "fix the file, or point AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE at another",
            )
        })
}

fn shown(path: &Option<PathBuf>) -> String {
    path.as_ref().map_or_else(
        || "~/.aws (HOME is not set)".into(),
        |p| p.display().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    fn files(config: &str, credentials: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/config"), config).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
        dir
    }

    #[test]
    fn named_profile_merges_both_files_credentials_first() {
        let home = files(
            "[profile  lab]\nregion = eu-west-1\naws_access_key_id = FROMCONFIG\n\
             endpoint_url = http://localhost:9000\n",
            "[lab]\naws_access_key_id = AKID\naws_secret_access_key = se/cr+et\\x\n",
        );
        let env = env_of(vec![
            ("HOME", home.path().display().to_string()),
            ("AWS_PROFILE", "lab".into()),
        ]);
        let p = load(&env).unwrap().unwrap();
        assert_eq!(p.static_keys(), Some(("AKID", "se/cr+et\\x", None)));
        assert_eq!(p.get("region"), Some("eu-west-1"));
        assert_eq!(p.get("endpoint_url"), Some("http://localhost:9000"));
        assert_eq!(p.role_source(), None);
    }

    #[test]
    fn default_profile_absent_is_none_named_absent_is_an_error() {
        let home = files("[profile other]\nregion = x\n", "");
        let home_var = ("HOME", home.path().display().to_string());
        assert!(load(&env_of(vec![home_var.clone()])).unwrap().is_none());
        let err = load(&env_of(vec![home_var, ("AWS_PROFILE", "lab".into())])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("AWS_PROFILE=lab: no such profile"),
            "{err}"
        );
    }

    #[test]
    fn files_named_by_variables_and_indirect_profiles() {
        let home = files("", "");
        let config = home.path().join("cfg");
        std::fs::write(&config, "[default]\ncredential_process = /bin/creds\n").unwrap();
        let env = env_of(vec![
            ("HOME", home.path().display().to_string()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
        ]);
        let p = load(&env).unwrap().unwrap();
        assert_eq!(p.static_keys(), None);
        assert!(p.has_credential_process());
        assert_eq!(p.role_source(), None);
    }

    #[test]
    fn aws_default_profile_first_and_roles_seen() {
        let home = files(
            "[profile role]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = lab\n",
            "[lab]\naws_access_key_id = A\naws_secret_access_key = B\n\n[role]\n\
             aws_access_key_id = C\naws_secret_access_key = D\n",
        );
        let env = env_of(vec![
            ("HOME", home.path().display().to_string()),
            ("AWS_DEFAULT_PROFILE", "role".into()),
            ("AWS_PROFILE", "lab".into()),
        ]);
        let p = load(&env).unwrap().unwrap();
        assert_eq!(p.name, "role");
        assert_eq!(p.role_source(), Some("role_arn"));
        let missing = env_of(vec![
            ("HOME", home.path().display().to_string()),
            ("AWS_DEFAULT_PROFILE", "nope".into()),
        ]);
        let err = load(&missing).unwrap_err();
        assert!(
            err.to_string().contains("AWS_DEFAULT_PROFILE=nope"),
            "{err}"
        );
    }

    #[test]
    fn the_later_of_default_and_profile_default_wins_whole() {
        let home = files(
            "[default]\nregion = eu-west-1\nendpoint_url = http://old:9000\n\n\
             [profile default]\nregion = us-east-2\n",
            "",
        );
        let env = env_of(vec![("HOME", home.path().display().to_string())]);
        let p = load(&env).unwrap().unwrap();
        assert_eq!(p.get("region"), Some("us-east-2"));
        assert_eq!(p.get("endpoint_url"), None);
    }

    #[test]
    fn malformed_file_names_it() {
        let home = files("[profile lab\nregion = x\n", "");
        let env = env_of(vec![("HOME", home.path().display().to_string())]);
        let err = load(&env).unwrap_err();
        assert_eq!(err.exit_code(), 65);
        assert!(err.to_string().contains(".aws/config"), "{err}");
    }
}
