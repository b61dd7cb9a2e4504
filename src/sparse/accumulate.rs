//! Error feedback's first step, the CPU twin of the `gtopk_accumulate` kernel:
//! `acc = residual + g`, where g is the gradient or, with DGC momentum correction m, the corrected
//! velocity `u = m * u + grad` (stored back). Without a residual (dense S-SGD) `acc = g`. The kernel
//! works in place (its accumulator holds the residual on entry); here the two are separate buffers,
//! so one pass reads both and writes the accumulator.

pub fn accumulate(grad: &[f32], residual: Option<&[f32]>, acc: &mut [f32], mut momentum: Option<(&mut [f32], f32)>) {
    debug_assert_eq!(grad.len(), acc.len());
    for (i, a) in acc.iter_mut().enumerate() {
        let g = match &mut momentum {
            Some((u, m)) => {
                u[i] = *m * u[i] + grad[i];
                u[i]
            }
            None => grad[i],
        };
        *a = match residual {
            Some(r) => r[i] + g,
            None => g,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_gradient_or_the_corrected_velocity() {
        let mut acc = vec![0.0f32; 2];
        accumulate(&[0.5, 0.25], Some(&[1.0, -1.0]), &mut acc, None);
        assert_eq!(acc, [1.5, -0.75]);
        let residual = acc.clone();
        let mut u = vec![2.0f32, 0.0];
        accumulate(&[1.0, 1.0], Some(&residual), &mut acc, Some((&mut u, 0.5)));
        assert_eq!(u, [2.0, 1.0]);
        assert_eq!(acc, [3.5, 0.25]);
        accumulate(&[1.0, 1.0], None, &mut acc, None);
        assert_eq!(acc, [1.0, 1.0]);
    }
}
