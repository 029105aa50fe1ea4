//! Chat's data-centre regions and their REST domains (`shared/chat-api/rest-conventions.md`).

use std::fmt;
use std::str::FromStr;

/// A Chat region. The SDKAppID lives in exactly one; calling another answers 70016/70020.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    China,
    Singapore,
    Seoul,
    Tokyo,
    Frankfurt,
    Mumbai,
    SiliconValley,
    Jakarta,
    Riyadh,
}

impl Region {
    /// Every region, in the order the docs list them.
    pub const ALL: [Region; 9] = [
        Region::China,
        Region::Singapore,
        Region::Seoul,
        Region::Tokyo,
        Region::Frankfurt,
        Region::Mumbai,
        Region::SiliconValley,
        Region::Jakarta,
        Region::Riyadh,
    ];

    /// The config spelling (`chat.region`).
    pub fn as_str(self) -> &'static str {
        match self {
            Region::China => "china",
            Region::Singapore => "singapore",
            Region::Seoul => "seoul",
            Region::Tokyo => "tokyo",
            Region::Frankfurt => "frankfurt",
            Region::Mumbai => "mumbai",
            Region::SiliconValley => "silicon-valley",
            Region::Jakarta => "jakarta",
            Region::Riyadh => "riyadh",
        }
    }

    /// The primary REST domain.
    pub fn domain(self) -> &'static str {
        match self {
            Region::China => "console.tim.qq.com",
            Region::Singapore => "adminapisgp.im.qcloud.com",
            Region::Seoul => "adminapikr.im.qcloud.com",
            Region::Tokyo => "adminapijpn.im.qcloud.com",
            Region::Frankfurt => "adminapiger.im.qcloud.com",
            Region::Mumbai => "adminapiind.im.qcloud.com",
            Region::SiliconValley => "adminapiusa.im.qcloud.com",
            Region::Jakarta => "adminapiidn.im.qcloud.com",
            Region::Riyadh => "adminapiksa.im.qcloud.com",
        }
    }

    /// The backup domain, for when the primary cannot be resolved or reached.
    pub fn backup_domain(self) -> Option<&'static str> {
        match self {
            Region::China => Some("adminapi.my-imcloud.com"),
            Region::Singapore => Some("adminapisgp.my-imcloud.com"),
            Region::Seoul => Some("adminapikr.my-imcloud.com"),
            Region::Tokyo => Some("adminapijpn.my-imcloud.com"),
            Region::Frankfurt => Some("adminapiger.my-imcloud.com"),
            Region::Mumbai => Some("adminapiind.my-imcloud.com"),
            Region::SiliconValley => Some("adminapiusa.my-imcloud.com"),
            Region::Jakarta => Some("adminapiidn.my-imcloud.com"),
            Region::Riyadh => None,
        }
    }

    /// The valid spellings, comma-separated, for error messages.
    pub fn valid_names() -> String {
        Region::ALL
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown region name; its message lists the valid ones.
#[derive(Debug, thiserror::Error)]
#[error("unknown region {0:?}; valid regions are: {valids}", valids = Region::valid_names())]
pub struct UnknownRegion(pub String);

impl FromStr for Region {
    type Err = UnknownRegion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Region::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRegion(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_valid() {
        for r in Region::ALL {
            assert_eq!(r.as_str().parse::<Region>().unwrap(), r);
        }
        let e = "mars".parse::<Region>().unwrap_err().to_string();
        assert!(e.contains("mars") && e.contains("silicon-valley") && e.contains("riyadh"));
        assert_eq!(Region::Riyadh.backup_domain(), None);
        assert_eq!(Region::Singapore.domain(), "adminapisgp.im.qcloud.com");
    }
}
