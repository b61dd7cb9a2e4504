//! Error feedback's first step, the CPU twin of the `gtopk_accumulate` kernel: `acc` holds the
//! residual on entry and `residual + g` on exit, where g is the gradient or, with DGC momentum
//! correction m, the corrected velocity `u = m * u + grad` (which is stored back).

pub fn accumulate(grad: &[f32], acc: &mut [f32], momentum: Option<(&mut [f32], f32)>) {
    debug_assert_eq!(grad.len(), acc.len());
    match momentum {
        None => {
            for (a, &g) in acc.iter_mut().zip(grad) {
                *a += g;
            }
        }
        Some((u, m)) => {
            for ((a, u), &g) in acc.iter_mut().zip(u.iter_mut()).zip(grad) {
                *u = m * *u + g;
                *a += *u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_gradient_or_the_corrected_velocity() {
        let mut acc = vec![1.0f32, -1.0];
        accumulate(&[0.5, 0.25], &mut acc, None);
        assert_eq!(acc, [1.5, -0.75]);
        let mut u = vec![2.0f32, 0.0];
        accumulate(&[1.0, 1.0], &mut acc, Some((&mut u, 0.5)));
        assert_eq!(u, [2.0, 1.0]);
        assert_eq!(acc, [3.5, 0.25]);
    }
}
