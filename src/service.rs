//! The CM rules: request lifecycle, card binding and the key-release decision of SPEC
//! section 2, over the store, the policy and the HSM pool. Knows nothing of HTTP.

use std::sync::Arc;

use uuid::Uuid;

use crate::audit::AuditEvent;
use crate::config::Template;
use crate::diversify::{AdminKey, AdminKeyType};
use crate::domain::{Atr, CardId, RequestStatus, RequestType, SmartcardStatus};
use crate::hsm::{DerivationPool, HsmError, KeySession, MasterKeys, NotAnswered, Undelivered};
use crate::policy::{Caller, Permission};
use crate::store::{KeyBinding, Request, Smartcard, Store, StoreError, Tx};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadInput(String),
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
    /// The audit record could not be written, so nothing was released.
    #[error("audit trail unavailable: {0}")]
    AuditUnavailable(String),
}

fn forbidden(code: &'static str, message: impl Into<String>) -> ServiceError {
    ServiceError::Forbidden {
        code,
        message: message.into(),
    }
}

/// Who is calling, from where, under which correlation id: the audit trail's "who".
pub struct CallContext<'a> {
    pub caller: &'a Caller,
    pub source: Option<String>,
    pub correlation_id: String,
}

impl CallContext<'_> {
    /// An audit event of this call; the caller fills in what happened.
    pub fn event(&self, action: &str) -> AuditEvent {
        AuditEvent {
            caller: Some(self.caller.name.clone()),
            source: self.source.clone(),
            correlation_id: Some(self.correlation_id.clone()),
            action: action.to_owned(),
            ..AuditEvent::default()
        }
    }
}

/// The audit outcome of a refused key request.
fn outcome_of(e: &ServiceError) -> String {
    match e {
        ServiceError::Forbidden { code, .. } => format!("denied:{code}"),
        ServiceError::NotFound(_) => "not_found".into(),
        ServiceError::BadInput(_) => "bad_request".into(),
        ServiceError::Conflict(_) => "conflict".into(),
        ServiceError::Hsm(h) if h.is_transient() => "hsm_unavailable".into(),
        _ => "error".into(),
    }
}

fn key_event(
    ctx: &CallContext<'_>,
    action: &str,
    request: Uuid,
    card: Uuid,
    card_id: CardId,
) -> AuditEvent {
    let mut event = ctx.event(action);
    event.request = Some(request);
    event.smartcard = Some(card);
    event.card_id = Some(card_id.to_string());
    event
}

/// Whether the request still releases keys for the card (re-read inside a write transaction).
fn still_releasable(tx: &Tx, request: &Uuid, card: &Uuid) -> Result<bool, ServiceError> {
    let request_ok = tx
        .request(request)?
        .is_some_and(|r| r.status.releases_keys() && r.binds(card));
    let card_ok = tx.card(card)?.is_some_and(|c| {
        !matches!(
            c.status,
            SmartcardStatus::Retired | SmartcardStatus::Disabled
        )
    });
    Ok(request_ok && card_ok)
}

/// Only issued cards can be unblocked, renewed, retired…; a retired card comes back only
/// through a new enrollment that binds it again.
fn may_act_on(request_type: RequestType, card: &Smartcard) -> Result<(), ServiceError> {
    let allowed = match request_type {
        RequestType::Reinstate => matches!(
            card.status,
            SmartcardStatus::Suspended | SmartcardStatus::Disabled
        ),
        _ => matches!(
            card.status,
            SmartcardStatus::Active | SmartcardStatus::Suspended
        ),
    };
    if allowed {
        Ok(())
    } else {
        Err(ServiceError::Conflict(format!(
            "a {} request cannot act on a card whose status is {}",
            request_type.name(),
            card.status.name()
        )))
    }
}

/// What `POST /requests` carries, parsed.
pub struct NewRequest {
    pub request_type: RequestType,
    pub template: Option<Uuid>,
    pub smartcard: Option<Uuid>,
    pub target: Option<String>,
    pub comment: Option<String>,
    pub priority: i64,
}

/// The outcome of a key request that passed every check.
pub enum KeyRelease {
    /// The template does not diversify: the client keeps the default admin key.
    NotDiversified,
    Key {
        key: AdminKey,
        master_key_label: String,
        version: u32,
    },
}

pub struct Service {
    keys: Arc<KeyRules>,
    pool: DerivationPool,
}

/// Resolves `request` for a caller who needs `permission` on its template. An unknown
/// request is 404 only to callers who hold the permission somewhere: others learn nothing.
fn authorize<T>(
    caller: &Caller,
    permission: Permission,
    found: Option<T>,
    template_of: impl Fn(&T) -> Uuid,
    what: &str,
) -> Result<T, ServiceError> {
    match found {
        Some(item) if caller.may(permission, &template_of(&item)) => Ok(item),
        None if caller.may_anywhere(permission) => {
            Err(ServiceError::NotFound(format!("{what} not found")))
        }
        _ => Err(forbidden(
            "PermissionDenied",
            format!("caller lacks the {permission:?} permission on this {what}'s profile template"),
        )),
    }
}

/// Resolves an object for a caller who needs some permission on its template; as in
/// [`authorize`], callers with no permission at all cannot tell unknown ids from others.
fn visible<T>(
    caller: &Caller,
    found: Option<T>,
    template_of: impl Fn(&T) -> Uuid,
    what: &str,
) -> Result<T, ServiceError> {
    match found {
        Some(item) if caller.sees(&template_of(&item)) => Ok(item),
        None if caller.sees_any() => Err(ServiceError::NotFound(format!("{what} not found"))),
        _ => Err(forbidden(
            "PermissionDenied",
            format!("caller holds no permission on this {what}'s profile template"),
        )),
    }
}

impl Service {
    pub fn new(
        templates: Vec<Template>,
        masters: MasterKeys,
        store: Arc<Store>,
        pool: DerivationPool,
    ) -> Self {
        Self {
            keys: Arc::new(KeyRules {
                store,
                templates,
                masters,
            }),
            pool,
        }
    }

    pub fn into_pool(self) -> DerivationPool {
        self.pool
    }

    fn template(&self, id: &Uuid) -> Option<&Template> {
        self.keys.template(id)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tx) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let store = Arc::clone(&self.keys.store);
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|e| ServiceError::Internal(format!("store task: {e}")))?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tx) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let store = Arc::clone(&self.keys.store);
        tokio::task::spawn_blocking(move || store.write(f))
            .await
            .map_err(|e| ServiceError::Internal(format!("store task: {e}")))?
    }

    /// Templates on which the caller holds some permission.
    pub fn templates_for(&self, caller: &Caller) -> Vec<&Template> {
        self.keys
            .templates
            .iter()
            .filter(|t| caller.sees(&t.uuid))
            .collect()
    }

    pub fn template_for(&self, caller: &Caller, id: &Uuid) -> Result<&Template, ServiceError> {
        match self.template(id) {
            Some(t) if caller.sees(id) => Ok(t),
            Some(_) => Err(forbidden(
                "PermissionDenied",
                "caller holds no permission on this profile template",
            )),
            None => Err(ServiceError::NotFound("profile template not found".into())),
        }
    }

    pub async fn create_request(
        &self,
        ctx: &CallContext<'_>,
        new: NewRequest,
    ) -> Result<Request, ServiceError> {
        let caller = ctx.caller;
        if new.request_type == RequestType::None {
            return Err(ServiceError::BadInput(
                "type None cannot be requested".into(),
            ));
        }
        let existing = if new.request_type.acts_on_existing_card() {
            let Some(card_uuid) = new.smartcard else {
                return Err(ServiceError::BadInput(format!(
                    "a {} request names the issued card in \"smartcard\"",
                    new.request_type.name()
                )));
            };
            let card = self.read(move |tx| Ok(tx.card(&card_uuid)?)).await?;
            let card = authorize(
                caller,
                Permission::Request,
                card,
                |c| c.template,
                "smart card",
            )?;
            if new.template.is_some_and(|t| t != card.template) {
                return Err(ServiceError::BadInput(
                    "profiletemplateuuid differs from the smart card's profile template".into(),
                ));
            }
            may_act_on(new.request_type, &card)?;
            Some(card)
        } else {
            if new.smartcard.is_some() {
                return Err(ServiceError::BadInput(format!(
                    "a {} request binds a new card with POST /smartcards, not \"smartcard\"",
                    new.request_type.name()
                )));
            }
            None
        };
        let template_id = match (&existing, new.template) {
            (Some(card), _) => card.template,
            (None, Some(t)) => t,
            (None, None) => {
                return Err(ServiceError::BadInput(
                    "profiletemplateuuid is required".into(),
                ));
            }
        };
        let template = self
            .template(&template_id)
            .ok_or_else(|| ServiceError::NotFound("profile template not found".into()))?;
        if !caller.may(Permission::Request, &template_id) {
            return Err(forbidden(
                "PermissionDenied",
                "caller lacks the Request permission on this profile template",
            ));
        }
        let request = Request {
            uuid: Uuid::new_v4(),
            request_type: new.request_type,
            status: if template.approvals_required == 0 {
                RequestStatus::Approved
            } else {
                RequestStatus::Pending
            },
            template: template_id,
            new_smartcard: None,
            old_smartcard: existing.as_ref().map(|c| c.uuid),
            originator_uuid: caller.uuid,
            originator_name: caller.name.clone(),
            target: new.target,
            comment: new.comment,
            priority: new.priority,
            submitted: String::new(),
            completed: None,
        };
        let mut event = ctx.event("request.create");
        event.request = Some(request.uuid);
        event.smartcard = request.old_smartcard;
        event.card_id = existing.as_ref().map(|c| c.card_id.to_string());
        event.template = Some(request.template);
        event.outcome = request.status.name().to_owned();
        self.write(move |tx| {
            if let Some(card) = &existing {
                // Re-read inside the write transaction: the card may have moved meanwhile.
                let now = tx
                    .card(&card.uuid)?
                    .ok_or_else(|| ServiceError::NotFound("smart card not found".into()))?;
                may_act_on(request.request_type, &now)?;
                if !tx.open_requests_binding(&card.uuid)?.is_empty() {
                    return Err(ServiceError::Conflict(
                        "the smart card already has an open request".into(),
                    ));
                }
            }
            let created = tx.insert_request(&request)?;
            tx.append_audit(&event)?;
            Ok(created)
        })
        .await
    }

    pub async fn get_request(&self, caller: &Caller, id: Uuid) -> Result<Request, ServiceError> {
        let found = self.read(move |tx| Ok(tx.request(&id)?)).await?;
        visible(caller, found, |r| r.template, "request")
    }

    /// `PUT /requests/{id}`: approve, deny, complete, cancel or abandon.
    pub async fn set_request_status(
        &self,
        ctx: &CallContext<'_>,
        id: Uuid,
        status: &str,
    ) -> Result<Request, ServiceError> {
        let caller = ctx.caller;
        #[derive(Clone, Copy)]
        enum Action {
            Approve,
            Deny,
            Complete,
            Cancel,
            Abandon,
        }
        let action = match status.to_ascii_lowercase().as_str() {
            "approved" => Action::Approve,
            "denied" => Action::Deny,
            "completed" => Action::Complete,
            "canceled" | "cancelled" => Action::Cancel,
            "abandoned" => Action::Abandon,
            _ => {
                return Err(ServiceError::BadInput(format!(
                    "status {status:?}: use Completed, Canceled, Abandoned, Approved or Denied"
                )));
            }
        };
        let permission = match action {
            Action::Approve | Action::Deny => Permission::Approve,
            Action::Complete | Action::Cancel | Action::Abandon => Permission::Request,
        };
        let required = |t: &Uuid| {
            self.template(t)
                .map_or(u32::MAX, |t| t.approvals_required.max(1))
        };
        let found = self.read(move |tx| Ok(tx.request(&id)?)).await?;
        let request = authorize(caller, permission, found, |r| r.template, "request")?;
        let needed = required(&request.template);
        let separate_duties = self
            .template(&request.template)
            .is_some_and(|t| t.separate_duties);
        let approver = caller.name.clone();
        let mut event = ctx.event(match action {
            Action::Approve => "request.approve",
            Action::Deny => "request.deny",
            Action::Complete => "request.complete",
            Action::Cancel => "request.cancel",
            Action::Abandon => "request.abandon",
        });
        event.request = Some(id);
        event.template = Some(request.template);
        self.write(move |tx| {
            // Re-read inside the write transaction: the state may have moved meanwhile.
            let r = tx
                .request(&id)?
                .ok_or_else(|| ServiceError::NotFound("request not found".into()))?;
            let conflict = |what: &str| {
                Err(ServiceError::Conflict(format!(
                    "cannot {what} a request whose status is {}",
                    r.status.name()
                )))
            };
            match action {
                Action::Approve | Action::Deny if r.status != RequestStatus::Pending => {
                    return conflict("decide");
                }
                Action::Approve => {
                    if separate_duties && r.originator_name == approver {
                        return Err(forbidden(
                            "SeparationOfDuties",
                            "the originator of a request may not approve it",
                        ));
                    }
                    if tx.add_approval(&id, &approver)? >= needed {
                        tx.set_request_status(&id, RequestStatus::Approved)?;
                    }
                }
                Action::Deny => tx.set_request_status(&id, RequestStatus::Denied)?,
                Action::Complete => {
                    // Requests on an issued card need no binding step, so Approved will do.
                    let on_issued_card =
                        r.old_smartcard.is_some() && r.status == RequestStatus::Approved;
                    if r.status != RequestStatus::Executing && !on_issued_card {
                        return conflict("complete");
                    }
                    tx.set_request_status(&id, RequestStatus::Completed)?;
                    // The bound card becomes Active unless it was retired or disabled meanwhile.
                    if let Some(card) = r.new_smartcard
                        && tx
                            .card(&card)?
                            .is_some_and(|c| c.status == SmartcardStatus::Assigned)
                    {
                        tx.set_card_status(&card, SmartcardStatus::Active)?;
                    }
                    if let Some(card) = r.old_smartcard {
                        let status = match r.request_type {
                            RequestType::Retire => Some(SmartcardStatus::Retired),
                            RequestType::Revoke => Some(SmartcardStatus::Disabled),
                            RequestType::Reinstate => Some(SmartcardStatus::Active),
                            _ => None,
                        };
                        if let Some(status) = status {
                            tx.set_card_status(&card, status)?;
                        }
                    }
                }
                Action::Cancel | Action::Abandon => {
                    if r.status.is_final() {
                        return conflict("end");
                    }
                    let to = match action {
                        Action::Cancel => RequestStatus::Canceled,
                        _ => RequestStatus::Failed,
                    };
                    tx.set_request_status(&id, to)?;
                    if let Some(card) = r.new_smartcard {
                        tx.restore_card_status(&card)?;
                    }
                }
            }
            let after = tx
                .request(&id)?
                .ok_or_else(|| ServiceError::Internal("request vanished".into()))?;
            event.smartcard = after.new_smartcard.or(after.old_smartcard);
            event.outcome = after.status.name().to_owned();
            tx.append_audit(&event)?;
            Ok(after)
        })
        .await
    }

    /// `POST /smartcards`: binds a card to an Approved or Executing request. The card's key
    /// derivation (master key label, version, algorithm settings) is pinned at its first binding.
    pub async fn bind_card(
        &self,
        ctx: &CallContext<'_>,
        request_id: Uuid,
        card_id: CardId,
        atr: Option<Atr>,
    ) -> Result<Smartcard, ServiceError> {
        let caller = ctx.caller;
        let found = self.read(move |tx| Ok(tx.request(&request_id)?)).await?;
        let request = authorize(caller, Permission::Bind, found, |r| r.template, "request")?;
        let template = self.template(&request.template).ok_or_else(|| {
            forbidden(
                "TemplateNotConfigured",
                "the request's profile template is no longer configured",
            )
        })?;
        let binding = match (&template.derivation, &template.master_key) {
            (Some(derivation), Some(label)) => {
                let master = self.keys.masters.current(label).ok_or_else(|| {
                    ServiceError::Internal(format!(
                        "master key {label:?} has no version in service for new cards"
                    ))
                })?;
                Some(KeyBinding {
                    master_key_label: master.label.clone(),
                    version: master.version,
                    master_key_kcv: Some(master.kcv.to_string()),
                    derivation: derivation.clone(),
                })
            }
            _ => None,
        };
        if let (Some(b), Some(master)) = (
            &binding,
            binding
                .as_ref()
                .and_then(|b| self.keys.masters.version(&b.master_key_label, b.version)),
        ) {
            // The version a card is pinned to must exist and be the same key right now.
            let kcv = self.pool.master_key_kcv(master).await?;
            if kcv != master.kcv {
                return Err(ServiceError::Internal(format!(
                    "master key {:?} version {} changed on the token; restart divkey",
                    b.master_key_label, b.version
                )));
            }
        }
        let template_id = template.uuid;
        let mut event = ctx.event("card.bind");
        event.request = Some(request_id);
        event.card_id = Some(card_id.to_string());
        event.template = Some(template_id);
        event.outcome = RequestStatus::Executing.name().to_owned();
        self.write(move |tx| {
            let r = tx
                .request(&request_id)?
                .ok_or_else(|| ServiceError::NotFound("request not found".into()))?;
            if !r.status.releases_keys() {
                return Err(forbidden(
                    "RequestNotApproved",
                    format!(
                        "the request is {}; cards bind to Approved or Executing requests",
                        r.status.name()
                    ),
                ));
            }
            let existing = tx.card_by_card_id(&card_id)?;
            // The request's own card again: idempotent (and for a request on an issued card,
            // the start of its execution).
            if let Some(card) = existing.as_ref().filter(|c| r.binds(&c.uuid)) {
                if let Some(atr) = &atr {
                    tx.set_card_atr(&card.uuid, atr)?;
                }
                tx.set_request_status(&request_id, RequestStatus::Executing)?;
                event.smartcard = Some(card.uuid);
                tx.append_audit(&event)?;
                return Ok(tx.card(&card.uuid)?.unwrap_or_else(|| card.clone()));
            }
            if r.new_smartcard.is_some() || r.old_smartcard.is_some() {
                return Err(ServiceError::Conflict(
                    "the request already has a smart card bound".into(),
                ));
            }
            let card = match existing {
                Some(card) => {
                    // A card's key is pinned to the template it was issued under: moving it
                    // would hand its key to callers of another template.
                    if card.template != template_id {
                        return Err(ServiceError::Conflict(
                            "the card was issued under another profile template".into(),
                        ));
                    }
                    if tx
                        .open_requests_binding(&card.uuid)?
                        .iter()
                        .any(|o| o.uuid != request_id)
                    {
                        return Err(ServiceError::Conflict(
                            "the card is bound to another open request".into(),
                        ));
                    }
                    tx.assign_card(&card.uuid)?;
                    if let Some(atr) = &atr {
                        tx.set_card_atr(&card.uuid, atr)?;
                    }
                    card
                }
                None => {
                    let card = Smartcard {
                        uuid: Uuid::new_v4(),
                        card_id,
                        status: SmartcardStatus::Assigned,
                        template: template_id,
                        atr: atr.map(|a| a.as_str().to_owned()),
                        key: binding,
                    };
                    tx.insert_card(&card)?;
                    card
                }
            };
            tx.set_request_new_card(&request_id, &card.uuid)?;
            tx.set_request_status(&request_id, RequestStatus::Executing)?;
            event.smartcard = Some(card.uuid);
            tx.append_audit(&event)?;
            Ok(tx.card(&card.uuid)?.unwrap_or(card))
        })
        .await
    }

    pub async fn get_card(&self, caller: &Caller, id: Uuid) -> Result<Smartcard, ServiceError> {
        let found = self.read(move |tx| Ok(tx.card(&id)?)).await?;
        visible(caller, found, |c| c.template, "smart card")
    }

    /// Cards with this card ID that the caller may see (zero or one).
    pub async fn find_cards(
        &self,
        caller: &Caller,
        card_id: CardId,
    ) -> Result<Vec<Smartcard>, ServiceError> {
        let found = self
            .read(move |tx| Ok(tx.card_by_card_id(&card_id)?))
            .await?;
        Ok(found
            .into_iter()
            .filter(|c| caller.sees(&c.template))
            .collect())
    }

    /// The diversifiedkey decision of SPEC section 2, steps 2 to 7 (the API did 1).
    ///
    /// Every outcome is audited; a released key is audited before it is returned, and if that
    /// record cannot be written the key is dropped (wiped) and the call fails.
    pub async fn release_key(
        &self,
        ctx: &CallContext<'_>,
        request_id: Uuid,
        card_uuid: Uuid,
        card_id: CardId,
    ) -> Result<KeyRelease, ServiceError> {
        let use_ = KeyUse::new(
            ctx,
            "key.release",
            Permission::ReadKey,
            request_id,
            card_uuid,
            card_id,
        );
        self.key_job(use_, |keys, hsm, job| {
            let card = job.bound_card(keys)?;
            let result = match job.derive(keys, hsm, &card)? {
                None => KeyRelease::NotDiversified,
                Some((key, binding)) => KeyRelease::Key {
                    key,
                    master_key_label: binding.master_key_label,
                    version: binding.version,
                },
            };
            let outcome = match result {
                KeyRelease::Key { .. } => Released::Key("released"),
                KeyRelease::NotDiversified => Released::Nothing("default_key"),
            };
            Ok((result, outcome))
        })
        .await
    }

    /// The answer to a card's admin challenge (SPEC section 2, authenticationresponse): the
    /// challenge encrypted under the card's diversified key, or under the template's default
    /// key when `diversified` is false. The key itself never leaves divkey.
    pub async fn authentication_response(
        &self,
        ctx: &CallContext<'_>,
        request_id: Uuid,
        card_uuid: Uuid,
        card_id: CardId,
        challenge: Zeroizing<Vec<u8>>,
        diversified: bool,
    ) -> Result<Vec<u8>, ServiceError> {
        let use_ = KeyUse::new(
            ctx,
            "key.authenticate",
            Permission::Authenticate,
            request_id,
            card_uuid,
            card_id,
        );
        self.key_job(use_, move |keys, hsm, job| {
            let card = job.bound_card(keys)?;
            // The challenge must fit the key before any key is touched.
            let key_type = if diversified {
                card.key.as_ref().map(|b| b.derivation.key_type())
            } else {
                keys.template(&card.template).map(|t| t.key_type)
            };
            if let Some(key_type) = key_type {
                let expected = if key_type == AdminKeyType::Des3 {
                    8
                } else {
                    16
                };
                if challenge.len() != expected {
                    return Err(ServiceError::BadInput(format!(
                        "challenge must be {expected} bytes for a {} key, not {}",
                        key_type.name(),
                        challenge.len()
                    )));
                }
            }
            let key = if diversified {
                match job.derive(keys, hsm, &card)? {
                    Some((key, _)) => key,
                    None => {
                        return Err(ServiceError::BadInput(
                            "the card's template does not diversify: use diversified=false".into(),
                        ));
                    }
                }
            } else {
                let template = keys.template(&card.template).ok_or_else(|| {
                    forbidden(
                        "TemplateNotConfigured",
                        "the card's profile template is not configured",
                    )
                })?;
                let bytes =
                    Zeroizing::new(hex::decode(&template.default_admin_key_hex).map_err(|_| {
                        ServiceError::Internal("default_admin_key_hex is not hex".into())
                    })?);
                job.event.algorithm = Some("default-key".into());
                AdminKey::new(template.key_type, bytes)
            };
            job.event.kcv = crate::kcv::admin_key_kcv(&key).map(|k| k.to_string());
            let response = crate::challenge::respond(&key, &challenge)
                .map_err(|e| ServiceError::BadInput(e.to_string()))?;
            Ok((response, Released::Key("responded")))
        })
        .await
    }

    /// Runs a key use as one job on an HSM worker: the store read, the derivation and the
    /// audit record together, so a key request costs one hand-off to the worker and one back.
    /// A job that never ran (queue full, deadline passed in the queue) is audited here.
    async fn key_job<T: Send + 'static>(
        &self,
        job: KeyUse,
        work: impl FnOnce(
            &KeyRules,
            &mut KeySession<'_>,
            &mut KeyUse,
        ) -> Result<(T, Released), ServiceError>
        + Send
        + 'static,
    ) -> Result<T, ServiceError> {
        let keys = Arc::clone(&self.keys);
        let unrun = job.event.clone();
        let (after, mut undelivered) = (Arc::clone(&self.keys), job.event.clone());
        let ran = self
            .pool
            .run_or(
                move |hsm| {
                    let mut job = job;
                    let result = work(&keys, hsm, &mut job);
                    let waiting = hsm.caller_waiting();
                    job.record(&keys.store, result, waiting)
                },
                // The caller left before the answer was handed over (deadline, dropped
                // connection): a release already recorded gets a record saying so, and a
                // job that panicked one saying it failed.
                move |left: Undelivered<Result<T, ServiceError>>| {
                    undelivered.outcome = match left {
                        Undelivered::Value(Ok(_)) => "withheld:CallerGone".into(),
                        Undelivered::Value(Err(_)) => return,
                        Undelivered::Panicked => "error".into(),
                        Undelivered::NotRun => "not_run:CallerGone".into(),
                    };
                    if let Err(e) = after.store.write(|tx| tx.append_audit(&undelivered)) {
                        tracing::error!(error = %e, "audit write failed");
                    }
                },
            )
            .await;
        match ran {
            Ok(result) => result,
            // Not answered in time, or never run: what the caller gets is recorded here. A
            // job still running records its own outcome as well when it ends (if it ever
            // does: a call can hang in the HSM for good), so the trail holds both.
            Err(NotAnswered { error, .. }) => {
                let refusal = ServiceError::from(error);
                let mut event = unrun;
                event.outcome = outcome_of(&refusal);
                if let Err(e) = self.record(event).await {
                    tracing::error!(error = %e, "audit write failed");
                }
                Err(refusal)
            }
        }
    }

    /// Appends one audit record.
    pub async fn record(&self, event: AuditEvent) -> Result<(), ServiceError> {
        self.write(move |tx| Ok(tx.append_audit(&event)?)).await
    }

    /// `PUT /requests/{reqid}/smartcards/{scid}`: sets a bound card's status (Retired,
    /// Disabled or Active). A retired card gets no keys until a new request binds it again.
    pub async fn set_card_status(
        &self,
        ctx: &CallContext<'_>,
        request_id: Uuid,
        card_uuid: Uuid,
        status: &str,
    ) -> Result<Smartcard, ServiceError> {
        let status = match SmartcardStatus::from_name(status) {
            Some(
                s
                @ (SmartcardStatus::Retired | SmartcardStatus::Disabled | SmartcardStatus::Active),
            ) => s,
            _ => {
                return Err(ServiceError::BadInput(format!(
                    "status {status:?}: use Retired, Disabled or Active"
                )));
            }
        };
        let found = self.read(move |tx| Ok(tx.request(&request_id)?)).await?;
        let request = authorize(
            ctx.caller,
            Permission::Request,
            found,
            |r| r.template,
            "request",
        )?;
        let mut event = ctx.event("card.status");
        event.request = Some(request_id);
        event.smartcard = Some(card_uuid);
        event.template = Some(request.template);
        event.outcome = status.name().to_owned();
        self.write(move |tx| {
            let r = tx
                .request(&request_id)?
                .ok_or_else(|| ServiceError::NotFound("request not found".into()))?;
            let card = tx
                .card(&card_uuid)?
                .ok_or_else(|| ServiceError::NotFound("smart card not found".into()))?;
            if !r.status.releases_keys() {
                return Err(forbidden(
                    "RequestNotActive",
                    format!(
                        "the request is {}; card status changes through an Approved or Executing request",
                        r.status.name()
                    ),
                ));
            }
            if !r.binds(&card.uuid) {
                return Err(forbidden(
                    "CardNotBound",
                    "the smart card is not bound to this request",
                ));
            }
            // Leaving Retired takes a new request that binds the card again; only a disabled
            // or suspended card is made Active here (a bound card becomes Active when its
            // request completes).
            let allowed = match status {
                SmartcardStatus::Active => matches!(
                    card.status,
                    SmartcardStatus::Active | SmartcardStatus::Disabled | SmartcardStatus::Suspended
                ),
                _ => card.status != SmartcardStatus::Retired || status == SmartcardStatus::Retired,
            };
            if !allowed {
                return Err(ServiceError::Conflict(format!(
                    "a card whose status is {} cannot be set {} here",
                    card.status.name(),
                    status.name()
                )));
            }
            event.card_id = Some(card.card_id.to_string());
            tx.set_card_status(&card.uuid, status)?;
            tx.append_audit(&event)?;
            tx.card(&card.uuid)?
                .ok_or_else(|| ServiceError::Internal("card vanished".into()))
        })
        .await
    }

    /// Readiness: a pooled HSM session and the store both answer.
    pub async fn ready(&self) -> Result<(), ServiceError> {
        self.pool.ping().await?;
        for master in self.keys.masters.all() {
            let kcv = self.pool.master_key_kcv(master).await?;
            if kcv != master.kcv {
                return Err(ServiceError::Internal(format!(
                    "master key {:?} now has KCV {kcv}, {} at start",
                    master.label, master.kcv
                )));
            }
        }
        self.read(|_| Ok(())).await?;
        Ok(())
    }
}

/// What a key job reads besides its own request: the store, the templates and the loaded
/// master keys, shared with the HSM workers.
struct KeyRules {
    store: Arc<Store>,
    templates: Vec<Template>,
    masters: MasterKeys,
}

impl KeyRules {
    fn template(&self, id: &Uuid) -> Option<&Template> {
        self.templates.iter().find(|t| t.uuid == *id)
    }
}

/// How a key use that passed every check is audited.
enum Released {
    /// A key was used: the record is written only if the request still releases keys.
    Key(&'static str),
    /// No key was used (the template does not diversify).
    Nothing(&'static str),
}

/// One key request, owned so that it can run on an HSM worker, with its audit record.
struct KeyUse {
    caller: Caller,
    permission: Permission,
    request_id: Uuid,
    card_uuid: Uuid,
    card_id: CardId,
    event: AuditEvent,
}

impl KeyUse {
    fn new(
        ctx: &CallContext<'_>,
        action: &str,
        permission: Permission,
        request_id: Uuid,
        card_uuid: Uuid,
        card_id: CardId,
    ) -> Self {
        Self {
            caller: ctx.caller.clone(),
            permission,
            request_id,
            card_uuid,
            card_id,
            event: key_event(ctx, action, request_id, card_uuid, card_id),
        }
    }

    /// Steps 2 to 4 of the key decision: the caller's permission on the request's template,
    /// the request and card known, the request active, the card bound to it and its card ID.
    fn bound_card(&mut self, keys: &KeyRules) -> Result<Smartcard, ServiceError> {
        let (request_id, card_uuid) = (self.request_id, self.card_uuid);
        let (request, card) = keys
            .store
            .read(|tx| Ok::<_, ServiceError>((tx.request(&request_id)?, tx.card(&card_uuid)?)))?;
        self.event.template = request.as_ref().map(|r| r.template);
        let request = authorize(
            &self.caller,
            self.permission,
            request,
            |r| r.template,
            "request",
        )?;
        let card = card.ok_or_else(|| ServiceError::NotFound("smart card not found".into()))?;
        if !request.status.releases_keys() {
            return Err(forbidden(
                "RequestNotActive",
                format!(
                    "the request is {}; keys are released for Approved or Executing requests",
                    request.status.name()
                ),
            ));
        }
        if !request.binds(&card.uuid) || card.template != request.template {
            return Err(forbidden(
                "CardNotBound",
                "the smart card is not bound to this request",
            ));
        }
        if card.card_id != self.card_id {
            return Err(forbidden(
                "CardIdMismatch",
                "cardid is not the bound card's card ID",
            ));
        }
        if matches!(
            card.status,
            SmartcardStatus::Retired | SmartcardStatus::Disabled
        ) {
            return Err(forbidden(
                "CardNotActive",
                format!("the smart card is {}", card.status.name()),
            ));
        }
        Ok(card)
    }

    /// Derives the card's admin key with the master key version and settings pinned to it;
    /// `None` for a card whose template does not diversify.
    fn derive(
        &mut self,
        keys: &KeyRules,
        hsm: &mut KeySession<'_>,
        card: &Smartcard,
    ) -> Result<Option<(AdminKey, KeyBinding)>, ServiceError> {
        let Some(binding) = card.key.clone() else {
            return Ok(None);
        };
        self.event.algorithm = Some(binding.derivation.algorithm_name());
        self.event.master_key_label = Some(binding.master_key_label.clone());
        self.event.master_key_version = Some(binding.version);
        let master = keys
            .masters
            .version(&binding.master_key_label, binding.version)
            .ok_or_else(|| {
                ServiceError::Internal(format!(
                    "master key {:?} version {} is not loaded",
                    binding.master_key_label, binding.version
                ))
            })?;
        if let Some(pinned) = &binding.master_key_kcv
            && *pinned != master.kcv.to_string()
        {
            // Same label and version, another key: deriving would hand the card a wrong key.
            return Err(ServiceError::Internal(format!(
                "master key {:?} version {} on the token has KCV {}, the card was issued under KCV {pinned}",
                binding.master_key_label, binding.version, master.kcv
            )));
        }
        let key = hsm.derive_admin_key(master, &binding.derivation, &card.card_id)?;
        self.event.kcv = crate::kcv::admin_key_kcv(&key).map(|k| k.to_string());
        Ok(Some((key, binding)))
    }

    /// Writes the audit record of the key use and passes the result on. The record and a
    /// last look at the request share one write transaction: a request completed or canceled
    /// while the key was derived gets nothing, and what the trail says happened is what
    /// happened. If the record cannot be written, or the caller stopped waiting (deadline),
    /// nothing made with the key is returned: it is dropped, and so wiped.
    ///
    /// The caller may still give up between this record and the answer; the trail then
    /// records a release the caller did not receive, never the other way round.
    fn record<T>(
        mut self,
        store: &Store,
        result: Result<(T, Released), ServiceError>,
        caller_waiting: bool,
    ) -> Result<T, ServiceError> {
        let (result, uses_key) = match result {
            Ok((_, Released::Key(_))) if !caller_waiting => {
                self.event.outcome = "withheld:DeadlinePassed".into();
                (Err(ServiceError::Hsm(HsmError::Timeout)), false)
            }
            Ok((done, Released::Key(outcome))) => {
                self.event.outcome = outcome.to_owned();
                (Ok(done), true)
            }
            Ok((done, Released::Nothing(outcome))) => {
                self.event.outcome = outcome.to_owned();
                (Ok(done), false)
            }
            Err(e) => {
                self.event.outcome = outcome_of(&e);
                (Err(e), false)
            }
        };
        let (request_id, card_uuid) = (self.request_id, self.card_uuid);
        let mut event = self.event;
        let outcome = event.outcome.clone();
        let written = store.write(|tx| {
            if uses_key && !still_releasable(tx, &request_id, &card_uuid)? {
                event.kcv = None;
                event.outcome = "denied:StateChanged".into();
                tx.append_audit(&event)?;
                return Ok(false);
            }
            tx.append_audit(&event)?;
            Ok::<_, ServiceError>(true)
        });
        match (result, written) {
            (Ok(done), Ok(true)) => Ok(done),
            (Ok(_withheld), Ok(false)) => Err(forbidden(
                "RequestNotActive",
                "the request or card changed state while the key was derived",
            )),
            (Ok(_withheld), Err(e)) => {
                tracing::error!(error = %e, outcome, "audit write failed: key withheld");
                Err(ServiceError::AuditUnavailable(e.to_string()))
            }
            (Err(refusal), Err(e)) => {
                tracing::error!(error = %e, outcome, "audit write failed");
                Err(refusal)
            }
            (Err(refusal), Ok(_)) => Err(refusal),
        }
    }
}
