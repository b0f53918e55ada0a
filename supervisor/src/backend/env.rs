//! The backend's environment, and its command line as the log shows it.

use gpuswap::config::ModelConfig;
use nix::unistd::User;

/// The backend's environment: nothing of the supervisor's but PATH, LANG and TZ; HOME and
/// USER of the user it runs as; CUDA_VISIBLE_DEVICES from `gpus`; then the model's `env`.
pub(super) fn backend_env(config: &ModelConfig, user: Option<&User>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.push(("PATH".into(), path));
    for name in ["LANG", "TZ"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.into(), value));
        }
    }
    match user {
        Some(user) => {
            env.push(("HOME".into(), user.dir.display().to_string()));
            env.push(("USER".into(), user.name.clone()));
        }
        None => {
            for name in ["HOME", "USER"] {
                if let Ok(value) = std::env::var(name) {
                    env.push((name.into(), value));
                }
            }
        }
    }
    if let Some(gpus) = &config.gpus
        && !config.env.contains_key("CUDA_VISIBLE_DEVICES")
    {
        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
        env.push(("CUDA_VISIBLE_DEVICES".into(), list.join(",")));
    }
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

pub(super) fn shell_words(words: &[String]) -> String {
    let quote = |w: &String| {
        if !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b))
        {
            w.clone()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_commands_for_the_log() {
        let words = ["python3", "-m", "x", "--name", "a b", "it's"].map(String::from);
        assert_eq!(shell_words(&words), r"python3 -m x --name 'a b' 'it'\''s'");
    }
}
