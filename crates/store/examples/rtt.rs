use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use std::time::Instant;

fn main() {
    for mt in [false, true] {
        let rt = if mt {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut c = SqliteConnectOptions::new().filename(dir.path().join("x.db")).create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal).synchronous(SqliteSynchronous::Normal).connect().await.unwrap();
            sqlx::query("create table t (id integer primary key, a text, b text, c int, d int, e int, f int, g int, h int, i int, j int, k int, l int, m int, n int, o int, p text, q text, r int, s int, u int, v int, w int, x int, y int, z int, aa int, bb int, cc int, dd int, ee int, ff int, gg int)").execute(&mut c).await.unwrap();
            let mut tx = c.begin().await.unwrap();
            for i in 0..1000i64 { sqlx::query("insert into t (id, a, b, c, d, e, f, g, h) values (?1, 'hello world', '{}', 1,2,3,4,5,6)").bind(i).execute(&mut *tx).await.unwrap(); }
            tx.commit().await.unwrap();
            let n = 500;
            let t = Instant::now();
            for _ in 0..n { let r = sqlx::query("select * from t limit 32").fetch_all(&mut c).await.unwrap(); assert_eq!(r.len(), 32); }
            println!("mt={mt} 32 rows x 33 cols: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
            let t = Instant::now();
            for _ in 0..n { let r = sqlx::query("select id from t limit 32").fetch_all(&mut c).await.unwrap(); assert_eq!(r.len(), 32); }
            println!("mt={mt} 32 rows x 1 col: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
            let t = Instant::now();
            for _ in 0..n { let r: String = sqlx::query_scalar("select json_group_array(json_array(id, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, u, v, w, x, y, z, aa, bb, cc, dd, ee, ff, gg)) from (select * from t limit 32)").fetch_one(&mut c).await.unwrap(); assert!(r.len() > 10); }
            println!("mt={mt} 32 rows as json: {:.1} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
        });
    }
}
