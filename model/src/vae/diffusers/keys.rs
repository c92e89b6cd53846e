//! The diffusers -> Burn key mapping of [`super`]: one table, [`DIFFUSERS_KEY_MAP`], read
//! in both directions and as burn-store's regex remapper.

use burn_store::KeyRemapper;

/// One rename between a diffusers key and a Burn parameter path.
#[derive(Clone, Copy, Debug)]
pub struct KeyRule {
    /// Text in the diffusers key.
    pub diffusers: &'static str,
    /// Its replacement in the Burn path.
    pub burn: &'static str,
    /// Only at the end of the key (parameter names); otherwise anywhere.
    pub suffix: bool,
    /// A legacy alias (old diffusers attention names): diffusers -> Burn only.
    pub legacy: bool,
}

const fn rule(diffusers: &'static str, burn: &'static str, suffix: bool, legacy: bool) -> KeyRule {
    KeyRule {
        diffusers,
        burn,
        suffix,
        legacy,
    }
}

/// The whole diffusers -> Burn key mapping, applied in order. Every other part of a key
/// is the same on both sides (`encoder.down_blocks.1.resnets.0.conv1.weight`,
/// `decoder.up_blocks.0.resnets.2.norm2...`, `mid_block.attentions.0.to_q...`,
/// `quant_conv`, `post_quant_conv`, `conv_in`, `conv_out`, `conv_norm_out`).
pub const DIFFUSERS_KEY_MAP: &[KeyRule] = &[
    // ResNet 1x1 shortcut: diffusers `conv_shortcut`, ours `shortcut`.
    rule(".conv_shortcut.", ".shortcut.", false, false),
    // The single sampler of a level: a ModuleList in diffusers, an Option here.
    rule(".downsamplers.0.", ".downsampler.", false, false),
    rule(".upsamplers.0.", ".upsampler.", false, false),
    // Attention output: `to_out` is a ModuleList [Linear, Dropout] in diffusers.
    rule(".to_out.0.", ".to_out.", false, false),
    // GroupNorm parameters: PyTorch weight/bias, Burn gamma/beta.
    rule(".norm1.weight", ".norm1.gamma", true, false),
    rule(".norm1.bias", ".norm1.beta", true, false),
    rule(".norm2.weight", ".norm2.gamma", true, false),
    rule(".norm2.bias", ".norm2.beta", true, false),
    rule(".group_norm.weight", ".group_norm.gamma", true, false),
    rule(".group_norm.bias", ".group_norm.beta", true, false),
    rule(".conv_norm_out.weight", ".conv_norm_out.gamma", true, false),
    rule(".conv_norm_out.bias", ".conv_norm_out.beta", true, false),
    // Diffusers < 0.14 attention names (Linear, or 1x1 conv in converted LDM files).
    rule(".query.", ".to_q.", false, true),
    rule(".key.", ".to_k.", false, true),
    rule(".value.", ".to_v.", false, true),
    rule(".proj_attn.", ".to_out.", false, true),
];

/// The Burn parameter path of a diffusers key.
pub fn burn_path(diffusers_key: &str) -> String {
    let mut key = diffusers_key.to_string();
    for r in DIFFUSERS_KEY_MAP {
        key = apply_rule(&key, r.diffusers, r.burn, r.suffix);
    }
    key
}

/// The (current, non-legacy) diffusers key of a Burn parameter path.
pub fn diffusers_key(burn_path: &str) -> String {
    let mut key = burn_path.to_string();
    for r in DIFFUSERS_KEY_MAP.iter().rev().filter(|r| !r.legacy) {
        key = apply_rule(&key, r.burn, r.diffusers, r.suffix);
    }
    key
}

fn apply_rule(key: &str, from: &str, to: &str, suffix: bool) -> String {
    if suffix {
        match key.strip_suffix(from) {
            Some(stem) => format!("{stem}{to}"),
            None => key.to_string(),
        }
    } else {
        key.replace(from, to)
    }
}

/// [`DIFFUSERS_KEY_MAP`] as burn-store's regex remapper.
pub fn key_remapper() -> KeyRemapper {
    let patterns = DIFFUSERS_KEY_MAP.iter().map(|r| {
        let from = r.diffusers.replace('.', r"\.");
        let from = if r.suffix { format!("{from}$") } else { from };
        (from, r.burn.to_string())
    });
    KeyRemapper::from_pattern_iter(patterns)
        .expect("DIFFUSERS_KEY_MAP should hold valid regular expressions")
}
