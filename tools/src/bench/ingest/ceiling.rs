//! The physical ceiling of ingest: binary `COPY` of the very rows ingest created (read back
//! from Antenna's tables) into fresh empty tables with the same columns and indexes.
//!
//! Values travel as the server's own binary encoding ([`Raw`]), so every column of every type
//! is copied exactly and the client does no conversion work.

use std::error::Error;
use std::time::Instant;

use bytes::BytesMut;
use futures_util::{pin_mut, StreamExt};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

use tally::store::Store;

/// The tables ingest inserts into, in foreign-key order.
const TABLES: [&str; 3] = ["main_occurrence", "main_detection", "main_classification"];

/// Row count and highest id of one table.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableRows {
    /// Rows.
    pub count: i64,
    /// Highest id (0 when empty).
    pub max_id: i64,
}

/// The rows ingest writes, at one moment: [`TABLES`] in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rows(pub [TableRows; 3]);

impl Rows {
    /// Reads the counts.
    pub async fn read(store: &Store) -> anyhow::Result<Rows> {
        let client = store.client().await?;
        let mut rows = Rows::default();
        for (i, table) in TABLES.iter().enumerate() {
            let r = client.query_one(&format!("SELECT count(*), coalesce(max(id), 0) FROM {table}"), &[]).await?;
            rows.0[i] = TableRows { count: r.try_get(0)?, max_id: r.try_get(1)? };
        }
        Ok(rows)
    }

    /// Detections (null markers included), classifications and occurrences.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|t| t.count.max(0) as u64).sum()
    }
}

/// What the raw `COPY` achieved.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// Rows copied.
    pub rows: u64,
    /// Seconds, from `BEGIN` to `COMMIT`.
    pub seconds: f64,
}

impl Ceiling {
    /// Rows per second.
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }
}

/// The raw `COPY` rate of the rows inserted between `before` and `after`: without, then with
/// Antenna's foreign keys.
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    /// Into tables `LIKE <table> INCLUDING ALL`: same columns, indexes and checks, no foreign
    /// keys (the physical ceiling the issue asks for).
    pub plain: Ceiling,
    /// The same, plus the table's foreign keys as Antenna declares them (deferred, so checked
    /// row by row at `COMMIT`, as they are for ingest).
    pub with_foreign_keys: Ceiling,
}

type Loaded = Vec<(&'static str, Vec<Type>, Vec<Vec<Raw>>)>;

/// Reads the rows inserted between `before` and `after`, then copies them into
/// `tally_copy_<table>` tables twice (see [`Ceilings`]), each time in one transaction, and
/// drops the tables.
pub async fn measure(store: &Store, before: &Rows, after: &Rows) -> anyhow::Result<Ceilings> {
    let client = store.client().await?;
    let mut loaded: Loaded = Vec::new();
    for (i, table) in TABLES.iter().enumerate() {
        let statement = client.prepare(&format!("SELECT * FROM {table} LIMIT 0")).await?;
        let types: Vec<Type> = statement.columns().iter().map(|c| c.type_().clone()).collect();
        let out = client
            .copy_out(&format!(
                "COPY (SELECT * FROM {table} WHERE id > {} AND id <= {} ORDER BY id) TO STDOUT (FORMAT binary)",
                before.0[i].max_id, after.0[i].max_id
            ))
            .await?;
        let stream = BinaryCopyOutStream::new(out, &types);
        pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.next().await {
            let row = row?;
            rows.push((0..types.len()).map(|c| row.try_get::<Raw>(c)).collect::<Result<Vec<_>, _>>()?);
        }
        loaded.push((table, types, rows));
    }
    drop(client);
    Ok(Ceilings { plain: copy(store, &loaded, false).await?, with_foreign_keys: copy(store, &loaded, true).await? })
}

/// One round: create the tables, copy every row in one transaction, drop the tables.
async fn copy(store: &Store, loaded: &Loaded, foreign_keys: bool) -> anyhow::Result<Ceiling> {
    let mut client = store.client().await?;
    for (table, _, _) in loaded {
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS tally_copy_{table}; CREATE TABLE tally_copy_{table} (LIKE {table} INCLUDING ALL)"
            ))
            .await?;
        if foreign_keys {
            let definitions = client
                .query(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'f'",
                    &[table],
                )
                .await?;
            for d in definitions {
                let definition: String = d.try_get(0)?;
                client.batch_execute(&format!("ALTER TABLE tally_copy_{table} ADD {definition}")).await?;
            }
        }
    }

    let started = Instant::now();
    let tx = client.transaction().await?;
    let mut copied = 0;
    for (table, types, rows) in loaded {
        let sink = tx.copy_in(&format!("COPY tally_copy_{table} FROM STDIN (FORMAT binary)")).await?;
        let writer = BinaryCopyInWriter::new(sink, types);
        pin_mut!(writer);
        for row in rows {
            let values: Vec<&(dyn ToSql + Sync)> = row.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&values).await?;
        }
        copied += writer.finish().await?;
    }
    tx.commit().await?;
    let seconds = started.elapsed().as_secs_f64();

    for (table, _, _) in loaded.iter().rev() {
        client.batch_execute(&format!("DROP TABLE tally_copy_{table}")).await?;
    }
    Ok(Ceiling { rows: copied, seconds })
}

/// A column value in the server's binary encoding, whatever its type (`None`: NULL).
#[derive(Debug)]
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl ToSql for Raw {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}
