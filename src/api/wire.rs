//! JSON shapes of the CM API: PascalCase names and integer enums, as MIM sends them.

use serde::Serialize;
use uuid::Uuid;

use crate::config::Template;
use crate::domain::{RequestStatus, RequestType, SmartcardStatus};
use crate::store::{Request, Smartcard};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProfileTemplate<'a> {
    pub uuid: Uuid,
    pub name: &'a str,
    pub description: &'a str,
    pub is_smartcard_profile_template: bool,
    pub is_virtual_smartcard_profile_template: bool,
}

impl<'a> From<&'a Template> for ProfileTemplate<'a> {
    fn from(t: &'a Template) -> Self {
        Self {
            uuid: t.uuid,
            name: &t.name,
            description: &t.description,
            is_smartcard_profile_template: true,
            is_virtual_smartcard_profile_template: false,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SmartcardConfiguration<'a> {
    pub diversify_admin_key: bool,
    pub default_admin_key_hex: &'a str,
    pub admin_key_type: &'a str,
    pub admin_key_algorithm: &'a str,
    pub user_pin_option: &'a str,
}

impl<'a> From<&'a Template> for SmartcardConfiguration<'a> {
    fn from(t: &'a Template) -> Self {
        Self {
            diversify_admin_key: t.derivation.is_some(),
            default_admin_key_hex: &t.default_admin_key_hex,
            admin_key_type: t.key_type.name(),
            admin_key_algorithm: &t.algorithm,
            user_pin_option: &t.user_pin_option,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestBody<'a> {
    pub uuid: Uuid,
    pub request_type: RequestType,
    pub status: RequestStatus,
    pub profile_template_uuid: Uuid,
    pub new_smartcard_uuid: Option<Uuid>,
    pub old_smartcard_uuid: Option<Uuid>,
    pub originator_user_uuid: Uuid,
    pub submitted: &'a str,
    pub completed: Option<&'a str>,
    pub comment: Option<&'a str>,
    pub priority: i64,
    pub target: Option<&'a str>,
}

impl<'a> From<&'a Request> for RequestBody<'a> {
    fn from(r: &'a Request) -> Self {
        Self {
            uuid: r.uuid,
            request_type: r.request_type,
            status: r.status,
            profile_template_uuid: r.template,
            new_smartcard_uuid: r.new_smartcard,
            old_smartcard_uuid: r.old_smartcard,
            originator_user_uuid: r.originator_uuid,
            submitted: &r.submitted,
            completed: r.completed.as_deref(),
            comment: r.comment.as_deref(),
            priority: r.priority,
            target: r.target.as_deref(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SmartcardBody<'a> {
    pub uuid: Uuid,
    pub status: SmartcardStatus,
    pub profile_template_uuid: Uuid,
    pub serial_number: String,
    pub atr: Option<&'a str>,
    pub middleware: Option<&'a str>,
    pub admin_key_version: Option<u32>,
}

impl<'a> From<&'a Smartcard> for SmartcardBody<'a> {
    fn from(c: &'a Smartcard) -> Self {
        Self {
            uuid: c.uuid,
            status: c.status,
            profile_template_uuid: c.template,
            serial_number: c.card_id.to_string(),
            atr: c.atr.as_deref(),
            middleware: None,
            admin_key_version: c.key.as_ref().map(|k| k.version),
        }
    }
}
