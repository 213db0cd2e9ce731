// Type-checks ../turnpike.json against Grafana's published dashboard schema
// (@grafana/schema, the types Grafana generates from its CUE schema).
//
// Two checks, because a JSON module is typed loosely by TypeScript:
//  1. `typed`: the JSON, with every string-valued enum / literal union of the
//     schema widened to `string` (a JSON module's strings are `string`, never a
//     literal), must be assignable to the schema: required fields present,
//     numbers/strings/booleans/arrays/objects where the schema has them.
//  2. `Exact`: every key, at every depth, must be a key the schema declares
//     (an imported JSON value is not a fresh object literal, so TypeScript's own
//     excess-property check does not apply). A misspelt key such as "titel"
//     is reported by its path. Where the schema is open (panel `options`,
//     query `targets`, `fieldConfig.defaults.custom`: Record<string, unknown>)
//     any key is accepted, as Grafana does.
import type { Dashboard } from '@grafana/schema';
import dashboard from '../turnpike.json';

type Widen<T> = T extends string
  ? string
  : T extends number
    ? number
    : T extends boolean
      ? boolean
      : T extends readonly (infer E)[]
        ? Widen<E>[]
        : T extends object
          ? { [K in keyof T]: Widen<T[K]> }
          : T;

// Keys and property types across the members of a union (Panel | RowPanel).
type Keys<S> = S extends unknown ? keyof S : never;
type Prop<S, K extends PropertyKey> = S extends unknown ? (K extends keyof S ? S[K] : never) : never;
type Elem<S> = S extends readonly (infer E)[] ? E : never;
type Obj<S> = S extends readonly unknown[] ? never : S extends object ? S : never;

// Paths (".panels[].titel") of keys that the schema does not declare. TypeScript
// pads the members of a JSON array's element union with `key?: undefined` for
// the keys of the other members; those are not real keys and are skipped.
type BadKeys<S, A, P extends string = ''> = unknown extends S
  ? never
  : A extends readonly (infer AE)[]
    ? BadKeys<Elem<NonNullable<S>>, AE, `${P}[]`>
    : A extends object
      ? {
          [K in keyof A & string]-?: K extends Keys<Obj<NonNullable<S>>>
            ? BadKeys<Prop<Obj<NonNullable<S>>, K>, A[K], `${P}.${K}`>
            : [A[K]] extends [undefined]
              ? never
              : `${P}.${K}`;
        }[keyof A & string]
      : never;

// Fails with: Type '".panels[].titel"' does not satisfy the constraint 'never'.
type NoUnknownKeys<T extends never> = T;

export const typed: Widen<Dashboard> = dashboard;
export type Exact = NoUnknownKeys<BadKeys<Dashboard, typeof dashboard>>;
