//! Queries of alerts, commands and presence, written once for both
//! backends: `shared_queries!(Store)` expands them into an `impl` of a
//! backend's store, which supplies `pool` (for reads), `sql` (its
//! placeholder style), `ROW_LOCK` (how a read locks the rows it will
//! change), `write_conn` (one write statement) and `begin_write` (a write
//! transaction, which derefs to the connection type `$conn`).

macro_rules! shared_queries {
    ($store:ty, $conn:ty) => {
        impl $store {
            pub async fn put_rule(
                &self,
                rule: &Rule,
                closing: &[NewAlertEvent],
                now: UnixNanos,
            ) -> Result<Vec<EventOutcome>, StorageError> {
                let definition = serde_json::to_string(rule).expect("rules serialise");
                let mut tx = self.begin_write().await?;
                sqlx::query(&Self::sql(alerts::UPSERT_RULE))
                    .bind(rule.id.as_str())
                    .bind(rule.severity.as_str())
                    .bind(rule.sensor.as_ref().map(|s| s.as_str()))
                    .bind(definition)
                    .bind(now)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                // A new version judges from scratch, as it did in memory.
                sqlx::query(&Self::sql(alerts::DELETE_RULE_PENDING))
                    .bind(rule.id.as_str())
                    .execute(&mut *tx)
                    .await?;
                let outcomes = Self::record_events_on(&mut *tx, closing, now).await?;
                tx.commit().await?;
                Ok(outcomes)
            }

            pub async fn delete_rule(
                &self,
                id: &RuleId,
                closing: &[NewAlertEvent],
                now: UnixNanos,
            ) -> Result<Option<Vec<EventOutcome>>, StorageError> {
                let mut tx = self.begin_write().await?;
                let done = sqlx::query(&Self::sql(alerts::DELETE_RULE))
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                sqlx::query(&Self::sql(alerts::DELETE_RULE_PENDING))
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                let outcomes = Self::record_events_on(&mut *tx, closing, now).await?;
                tx.commit().await?;
                Ok(Some(outcomes))
            }

            pub async fn list_rules(&self) -> Result<Vec<Rule>, StorageError> {
                let rows: Vec<String> =
                    sqlx::query_scalar("SELECT definition FROM alert_rules ORDER BY rule_id")
                        .fetch_all(&self.pool)
                        .await?;
                rows.iter()
                    .map(|json| alerts::rule_from_json(json))
                    .collect()
            }

            pub async fn open_alerts_of_rule(
                &self,
                id: &RuleId,
            ) -> Result<Vec<(u64, i64)>, StorageError> {
                let rows: Vec<(i64, i64)> = sqlx::query_as(&Self::sql(alerts::OPEN_ALERTS_OF_RULE))
                    .bind(id.as_str())
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(|(a, d)| (alerts::id(a), d)).collect())
            }

            pub async fn record_alert_events(
                &self,
                events: &[NewAlertEvent],
                now: UnixNanos,
            ) -> Result<Vec<EventOutcome>, StorageError> {
                let mut tx = self.begin_write().await?;
                let outcomes = Self::record_events_on(&mut *tx, events, now).await?;
                tx.commit().await?;
                Ok(outcomes)
            }

            pub async fn last_event_id(&self) -> Result<u64, StorageError> {
                let last: i64 = sqlx::query_scalar("SELECT last_id FROM alert_event_counter")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(alerts::id(last))
            }

            /// The one writer of `alert_events`: every event of every path
            /// (a group's readings, silences, acks, rule changes) is recorded
            /// here, inside the caller's transaction. Alert rows first, the
            /// event ids last (see `TAKE_EVENT_IDS`).
            /// The pk of a device's sensor, created if new, unless the
            /// device has `max_sensors` already (then `None`). For the
            /// group transaction, which holds the device's row lock (its
            /// committed sequence was read for update), so the count
            /// cannot race.
            pub(super) async fn sensor_pk_on(
                conn: &mut $conn,
                device_pk: i64,
                sensor: &SensorName,
                unit: &Unit,
                max_sensors: usize,
            ) -> Result<Option<i64>, sqlx::Error> {
                let existing: Option<i64> = sqlx::query_scalar(&Self::sql(
                    "SELECT pk FROM sensors WHERE device_pk = ? AND sensor = ? AND unit = ?",
                ))
                .bind(device_pk)
                .bind(sensor.as_str())
                .bind(unit.as_str())
                .fetch_optional(&mut *conn)
                .await?;
                if existing.is_some() {
                    return Ok(existing);
                }
                let count: i64 = sqlx::query_scalar(&Self::sql(
                    "SELECT COUNT(*) FROM sensors WHERE device_pk = ?",
                ))
                .bind(device_pk)
                .fetch_one(&mut *conn)
                .await?;
                if count as u64 >= max_sensors as u64 {
                    return Ok(None);
                }
                sqlx::query_scalar(&Self::sql(
                    "INSERT INTO sensors (device_pk, sensor, unit) VALUES (?, ?, ?) RETURNING pk",
                ))
                .bind(device_pk)
                .bind(sensor.as_str())
                .bind(unit.as_str())
                .fetch_one(&mut *conn)
                .await
                .map(Some)
            }

            pub(super) async fn record_events_on(
                conn: &mut $conn,
                events: &[NewAlertEvent],
                now: UnixNanos,
            ) -> Result<Vec<EventOutcome>, sqlx::Error> {
                let mut outcomes = Vec::with_capacity(events.len());
                // FIRED earlier in this call, for the RESOLVED that follow.
                let mut fired: Vec<((&RuleId, i64), i64)> = Vec::new();
                let mut to_record = Vec::new();
                for e in events {
                    let alert_id: Option<i64> = match (e.kind, e.alert_id) {
                        (EventKind::Fired, _) => {
                            let inserted: Option<i64> =
                                sqlx::query_scalar(&Self::sql(alerts::INSERT_ALERT))
                                    .bind(e.rule_id.as_str())
                                    .bind(e.device_pk)
                                    .bind(&e.sensor)
                                    .bind(e.severity.as_str())
                                    .bind(e.time)
                                    .bind(e.value)
                                    .bind(&e.message)
                                    .fetch_optional(&mut *conn)
                                    .await?;
                            if inserted.is_none() {
                                let open: i64 = sqlx::query_scalar(&Self::sql(alerts::OPEN_ALERT))
                                    .bind(e.rule_id.as_str())
                                    .bind(e.device_pk)
                                    .fetch_one(&mut *conn)
                                    .await?;
                                fired.push(((&e.rule_id, e.device_pk), open));
                                outcomes.push(EventOutcome::AlreadyOpen {
                                    alert_id: alerts::id(open),
                                });
                                continue;
                            }
                            inserted
                        }
                        (EventKind::Acked | EventKind::Resolved, id) => {
                            let id = match id {
                                Some(alerts::FIRED_EARLIER) | None => fired
                                    .iter()
                                    .rev()
                                    .find(|(key, _)| *key == (&e.rule_id, e.device_pk))
                                    .map(|(_, id)| *id),
                                Some(id) => Some(id.min(i64::MAX as u64) as i64),
                            };
                            match id {
                                Some(id) => {
                                    let done = if e.kind == EventKind::Acked {
                                        sqlx::query(&Self::sql(alerts::ACK_ALERT))
                                            .bind(e.time)
                                            .bind(id)
                                            .execute(&mut *conn)
                                            .await?
                                    } else {
                                        sqlx::query(&Self::sql(alerts::RESOLVE_ALERT))
                                            .bind(e.time)
                                            .bind(e.value)
                                            .bind(id)
                                            .execute(&mut *conn)
                                            .await?
                                    };
                                    (done.rows_affected() > 0).then_some(id)
                                }
                                None => None,
                            }
                        }
                    };
                    let Some(alert_id) = alert_id else {
                        outcomes.push(EventOutcome::Skipped);
                        continue;
                    };
                    if e.kind == EventKind::Fired {
                        fired.push(((&e.rule_id, e.device_pk), alert_id));
                    }
                    to_record.push((outcomes.len(), alert_id));
                    // Replaced below, once the event has its id.
                    outcomes.push(EventOutcome::Skipped);
                }
                if to_record.is_empty() {
                    return Ok(outcomes);
                }
                let last: i64 = sqlx::query_scalar(&Self::sql(alerts::TAKE_EVENT_IDS))
                    .bind(to_record.len() as i64)
                    .fetch_one(&mut *conn)
                    .await?;
                // Delivered at commit, when the events are visible.
                Self::notify_on(&mut *conn, cluster::channel::ALERTS, &last.to_string()).await?;
                cluster::test_hold_event_tx().await;
                let first = last - to_record.len() as i64 + 1;
                for (n, (i, alert_id)) in to_record.into_iter().enumerate() {
                    let e = &events[i];
                    let event_id = first + n as i64;
                    sqlx::query(&Self::sql(alerts::INSERT_EVENT))
                        .bind(event_id)
                        .bind(alert_id)
                        .bind(e.kind.as_str())
                        .bind(e.rule_id.as_str())
                        .bind(e.device_id.as_str())
                        .bind(&e.sensor)
                        .bind(e.severity.as_str())
                        .bind(e.value)
                        .bind(e.time)
                        .bind(&e.message)
                        .bind(now)
                        .execute(&mut *conn)
                        .await?;
                    outcomes[i] = EventOutcome::Recorded(AlertEventRecord {
                        event_id: alerts::id(event_id),
                        kind: e.kind,
                        alert_id: alerts::id(alert_id),
                        rule_id: e.rule_id.as_str().to_owned(),
                        device_id: e.device_id.as_str().to_owned(),
                        sensor: e.sensor.clone(),
                        severity: e.severity,
                        value: e.value,
                        time: e.time,
                        message: e.message.clone(),
                    });
                }
                Ok(outcomes)
            }

            /// Stores changes of remembered hold starts, inside the caller's
            /// transaction.
            pub(super) async fn set_pending_on(
                conn: &mut $conn,
                changes: &[PendingChange],
            ) -> Result<(), sqlx::Error> {
                for c in changes {
                    match c.since {
                        Some(since) => {
                            sqlx::query(&Self::sql(alerts::UPSERT_PENDING))
                                .bind(c.rule_id.as_str())
                                .bind(c.device_pk)
                                .bind(since)
                                .execute(&mut *conn)
                                .await?
                        }
                        None => {
                            sqlx::query(&Self::sql(alerts::DELETE_PENDING))
                                .bind(c.device_pk)
                                .bind(c.rule_id.as_str())
                                .execute(&mut *conn)
                                .await?
                        }
                    };
                }
                Ok(())
            }

            pub(super) async fn last_reading_on(
                conn: &mut $conn,
                device_pk: i64,
                sensor: &SensorName,
            ) -> Result<Option<(UnixNanos, f64)>, sqlx::Error> {
                sqlx::query_as(&Self::sql(alerts::LAST_READING))
                    .bind(device_pk)
                    .bind(sensor.as_str())
                    .fetch_optional(&mut *conn)
                    .await
            }

            pub async fn alert_events_after(
                &self,
                after: u64,
                limit: u32,
            ) -> Result<Vec<AlertEventRecord>, StorageError> {
                let rows = sqlx::query(&Self::sql(alerts::EVENTS_AFTER))
                    .bind(after.min(i64::MAX as u64) as i64)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(alerts::event_from_row).collect()
            }

            pub async fn list_alerts(
                &self,
                include_resolved: bool,
                device_ids: &[String],
                limit: u32,
            ) -> Result<Vec<AlertRecord>, StorageError> {
                let sql = Self::sql(&alerts::list_alerts_sql(include_resolved, device_ids.len()));
                let mut query = sqlx::query(&sql);
                for d in device_ids {
                    query = query.bind(d);
                }
                let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
                rows.iter().map(alerts::alert_from_row).collect()
            }

            pub async fn get_alert(&self, alert_id: u64) -> Result<AlertRecord, StorageError> {
                let sql = Self::sql(&format!(
                    "SELECT {} WHERE a.alert_id = ?",
                    alerts::ALERT_COLUMNS
                ));
                let row = sqlx::query(&sql)
                    .bind(alert_id.min(i64::MAX as u64) as i64)
                    .fetch_one(&self.pool)
                    .await?;
                alerts::alert_from_row(&row)
            }

            pub async fn enqueue_command(
                &self,
                device_pk: i64,
                kind: &CommandKind,
                created: UnixNanos,
                expires: UnixNanos,
                max_pending: u64,
            ) -> Result<CommandRecord, EnqueueError> {
                let mut tx = self.begin_write().await.map_err(StorageError::from)?;
                // Two senders (on any processes) counting at once would both
                // see room for one more: the device's row lock makes them
                // count in turn. (SQLite's write transaction already does.)
                sqlx::query(&Self::sql(&format!(
                    "SELECT pk FROM devices WHERE pk = ?{}",
                    Self::ROW_LOCK
                )))
                .bind(device_pk)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StorageError::from)?;
                let pending: i64 = sqlx::query_scalar(&Self::sql(commands::COUNT_PENDING))
                    .bind(device_pk)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StorageError::from)?;
                if pending as u64 >= max_pending {
                    return Err(EnqueueError::QueueFull(pending as u64));
                }
                let id: i64 = sqlx::query_scalar(&Self::sql(commands::INSERT_COMMAND))
                    .bind(device_pk)
                    .bind(kind.name())
                    .bind(kind.arguments().to_string())
                    .bind(created)
                    .bind(expires)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StorageError::from)?;
                // Wakes the device's stream wherever it is, once committed.
                Self::notify_on(&mut *tx, cluster::channel::CONTROL, &device_pk.to_string())
                    .await
                    .map_err(StorageError::from)?;
                tx.commit().await.map_err(StorageError::from)?;
                Ok(self.get_command(id as u64).await?)
            }

            pub async fn deliverable_commands(
                &self,
                device_pk: i64,
                now: UnixNanos,
            ) -> Result<Vec<CommandRecord>, StorageError> {
                let rows = sqlx::query(&Self::sql(&commands::deliverable_sql()))
                    .bind(device_pk)
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(commands::command_from_row).collect()
            }

            pub async fn mark_command_sent(
                &self,
                command_id: u64,
                now: UnixNanos,
            ) -> Result<bool, StorageError> {
                let done = sqlx::query(&Self::sql(commands::MARK_SENT))
                    .bind(now)
                    .bind(command_id as i64)
                    .execute(&mut *self.write_conn().await?)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            pub async fn ack_command(
                &self,
                device_pk: i64,
                command_id: u64,
                state: CommandState,
                result: &str,
                now: UnixNanos,
            ) -> Result<Option<CommandRecord>, StorageError> {
                let mut tx = self.begin_write().await?;
                let done = sqlx::query(&Self::sql(commands::ACK))
                    .bind(state.as_str())
                    .bind(result)
                    .bind(now)
                    .bind(now)
                    .bind(command_id.min(i64::MAX as u64) as i64)
                    .bind(device_pk)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                // For a SendCommand waiting on another process.
                Self::notify_on(
                    &mut *tx,
                    cluster::channel::COMMANDS,
                    &format!("{command_id}:{}", state.as_str()),
                )
                .await?;
                tx.commit().await?;
                Ok(Some(self.get_command(command_id).await?))
            }

            pub async fn expire_commands(&self, now: UnixNanos) -> Result<Vec<u64>, StorageError> {
                let mut tx = self.begin_write().await?;
                let ids: Vec<i64> = sqlx::query_scalar(&Self::sql(commands::EXPIRE))
                    .bind(now)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?;
                for id in &ids {
                    Self::notify_on(
                        &mut *tx,
                        cluster::channel::COMMANDS,
                        &format!("{id}:{}", CommandState::Expired.as_str()),
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(ids.into_iter().map(|id| id.max(0) as u64).collect())
            }

            pub async fn get_command(
                &self,
                command_id: u64,
            ) -> Result<CommandRecord, StorageError> {
                let sql = Self::sql(&format!(
                    "SELECT {} WHERE c.command_id = ?",
                    commands::COMMAND_COLUMNS
                ));
                let row = sqlx::query(&sql)
                    .bind(command_id.min(i64::MAX as u64) as i64)
                    .fetch_one(&self.pool)
                    .await?;
                commands::command_from_row(&row)
            }

            pub async fn list_commands(
                &self,
                device_id: Option<&str>,
                state: Option<CommandState>,
                after: u64,
                limit: u32,
            ) -> Result<Vec<CommandRecord>, StorageError> {
                let sql = Self::sql(&commands::list_sql(device_id.is_some(), state.is_some()));
                let mut query = sqlx::query(&sql).bind(after.min(i64::MAX as u64) as i64);
                if let Some(d) = device_id {
                    query = query.bind(d);
                }
                if let Some(s) = state {
                    query = query.bind(s.as_str());
                }
                let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
                rows.iter().map(commands::command_from_row).collect()
            }

            /// Sets a device's committed sequence to `to` (at most
            /// `i64::MAX`; the API refuses more) and returns the previous
            /// one with the device as it is now. The device's row is locked
            /// first (`ROW_LOCK`), as a group commit locks it before reading
            /// the marks, so the reset lands between two groups, never
            /// inside one.
            pub async fn reset_committed_sequence(
                &self,
                id: &DeviceId,
                to: u64,
            ) -> Result<(u64, DeviceRecord), StorageError> {
                let mut tx = self.begin_write().await?;
                let previous: Option<i64> = sqlx::query_scalar(&Self::sql(&format!(
                    "SELECT committed_sequence FROM devices WHERE device_id = ?{}",
                    Self::ROW_LOCK
                )))
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let previous = to_u64(
                    previous.ok_or(StorageError::NotFound)?,
                    "committed_sequence",
                )?;
                let row = sqlx::query(&Self::sql(&format!(
                    "UPDATE devices SET committed_sequence = ? WHERE device_id = ? \
                     RETURNING {DEVICE_COLUMNS}"
                )))
                // The API refused more; the bound only keeps the cast from
                // wrapping.
                .bind(to.min(i64::MAX as u64) as i64)
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await?;
                let device = device_from_row(&row)?;
                tx.commit().await?;
                Ok((previous, device))
            }

            pub async fn set_presence(
                &self,
                device_pk: i64,
                online: bool,
                seen: UnixNanos,
                firmware: Option<&str>,
            ) -> Result<(), StorageError> {
                sqlx::query(&Self::sql(commands::PRESENCE))
                    .bind(online)
                    .bind(seen)
                    .bind(firmware)
                    .bind(device_pk)
                    .execute(&mut *self.write_conn().await?)
                    .await?;
                Ok(())
            }

            /// Commands queued or sent and not yet answered, all devices.
            pub async fn pending_commands(&self) -> Result<i64, StorageError> {
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) FROM commands WHERE state IN ('queued', 'sent')",
                )
                .fetch_one(&self.pool)
                .await?)
            }

            /// Open alerts by severity.
            pub async fn open_alerts_by_severity(&self) -> Result<Vec<(String, i64)>, StorageError> {
                Ok(sqlx::query_as(
                    "SELECT severity, COUNT(*) FROM alerts WHERE resolved_unix_nano IS NULL GROUP BY severity",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            /// One trivial query: the database answers. Returns how long
            /// getting a pooled connection took.
            pub async fn ping(&self) -> Result<std::time::Duration, StorageError> {
                let started = std::time::Instant::now();
                let mut conn = self.pool.acquire().await?;
                let acquired = started.elapsed();
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                Ok(acquired)
            }

            pub async fn mark_all_offline(&self) -> Result<(), StorageError> {
                sqlx::query(commands::ALL_OFFLINE)
                    .execute(&mut *self.write_conn().await?)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(super) use shared_queries;
