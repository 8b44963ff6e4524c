//! Greedy continuation of token ids: `greedy MODEL.gguf N id,id,...` (a development aid).
use std::sync::Arc;

use capy_model::{Batch, Context, ContextParams, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = Arc::new(Model::load(&args[1])?);
    let n: usize = args[2].parse()?;
    let mut toks: Vec<u32> = args[3].split(',').map(|s| s.parse().unwrap()).collect();
    let mut ctx = Context::new(
        model,
        ContextParams {
            n_ctx: 512,
            ..Default::default()
        },
    );
    let mut batch = Batch::new();
    for (i, &t) in toks.iter().enumerate() {
        batch.push(t, i, 0, i + 1 == toks.len());
    }
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        let logits = ctx.decode(&batch)?;
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        let pos = toks.len();
        toks.push(best as u32);
        batch.clear();
        batch.push(best as u32, pos, 0, true);
    }
    println!("{:?}", toks);
    eprintln!("{:?}", t0.elapsed());
    Ok(())
}
