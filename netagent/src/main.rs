fn main() {
    println!("netagent");
}
